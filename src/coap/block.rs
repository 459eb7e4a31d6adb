//! Block-wise transfer of responses (RFC 7959 Block2) and BERT (RFC 8323 §6): which bytes a
//! request gets, from the client's Block2 wish and what the transport can carry.

use super::msg::decode_uint;

/// BERT counts NUM in 1024-byte units and carries payloads in multiples of 1024.
pub const BERT_UNIT: u64 = 1024;
pub const SZX_BERT: u8 = 7;
/// Largest NUM a Block option can carry (20 bits).
const MAX_NUM: u64 = (1 << 20) - 1;

/// A Block2 option value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u64,
    pub more: bool,
    pub szx: u8,
}

impl Block {
    pub fn decode(v: &[u8]) -> Option<Block> {
        if v.len() > 3 {
            return None;
        }
        let x = decode_uint(v);
        Some(Block {
            num: x >> 4,
            more: x & 0x8 != 0,
            szx: (x & 0x7) as u8,
        })
    }

    pub fn encode(self) -> u64 {
        (self.num << 4) | ((self.more as u64) << 3) | self.szx as u64
    }

    /// Block size for SZX 0..=6; BERT's unit for 7.
    pub fn size_of(szx: u8) -> u64 {
        if szx >= SZX_BERT {
            BERT_UNIT
        } else {
            1 << (szx + 4)
        }
    }
}

/// What the connection can carry in one response payload.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Largest payload that fits the peer's Max-Message-Size after our header and options.
    pub max_payload: u64,
    /// The peer announced Block-Wise-Transfer in its CSM (TCP only).
    pub bert: bool,
    /// Whether an unblocked response may carry a whole representation up to `max_payload`.
    /// True over TCP; over UDP a response larger than one block is always blocked.
    pub whole_fits: bool,
}

/// The slice of the representation one response carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub offset: u64,
    pub len: u64,
    /// The Block2 option of the response; `None` when the whole representation is sent.
    pub block: Option<Block>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("Block2 asks for bytes beyond the end of the representation")]
    BeyondEnd,
    #[error("BERT (SZX 7) needs CoAP over TCP with Block-Wise-Transfer in both CSMs")]
    BertNotNegotiated,
    #[error("Block2 option value is malformed")]
    Malformed,
    #[error("block number does not fit in 20 bits")]
    NumTooLarge,
}

/// Plans the response to a GET of a `size`-byte representation.
pub fn plan(size: u64, requested: Option<Block>, cap: Capacity) -> Result<Plan, BlockError> {
    let largest_szx = (0..=6u8)
        .rev()
        .find(|s| Block::size_of(*s) <= cap.max_payload)
        .unwrap_or(0);
    let bert_len = (cap.max_payload / BERT_UNIT) * BERT_UNIT;
    let use_bert = cap.bert && bert_len > BERT_UNIT;
    let Some(req) = requested else {
        if cap.whole_fits && size <= cap.max_payload {
            return Ok(Plan {
                offset: 0,
                len: size,
                block: None,
            });
        }
        if !cap.whole_fits && size <= Block::size_of(largest_szx) {
            return Ok(Plan {
                offset: 0,
                len: size,
                block: None,
            });
        }
        return if use_bert {
            block_at(size, 0, SZX_BERT, bert_len)
        } else {
            block_at(size, 0, largest_szx, Block::size_of(largest_szx))
        };
    };
    if req.szx == SZX_BERT {
        if !cap.bert {
            return Err(BlockError::BertNotNegotiated);
        }
        let offset = req
            .num
            .checked_mul(BERT_UNIT)
            .ok_or(BlockError::NumTooLarge)?;
        return block_at(size, offset, SZX_BERT, bert_len.max(BERT_UNIT));
    }
    let offset = req.num * Block::size_of(req.szx);
    // Late negotiation (RFC 7959 §2.5): a smaller size than asked when it does not fit.
    let szx = req.szx.min(largest_szx);
    block_at(size, offset, szx, Block::size_of(szx))
}

fn block_at(size: u64, offset: u64, szx: u8, len: u64) -> Result<Plan, BlockError> {
    if offset >= size && !(offset == 0 && size == 0) {
        return Err(BlockError::BeyondEnd);
    }
    let num = offset / Block::size_of(szx);
    if num > MAX_NUM {
        return Err(BlockError::NumTooLarge);
    }
    let len = len.min(size - offset);
    Ok(Plan {
        offset,
        len,
        block: Some(Block {
            num,
            more: offset + len < size,
            szx,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_1152: Capacity = Capacity {
        max_payload: 1100,
        bert: false,
        whole_fits: true,
    };
    const TCP_BERT: Capacity = Capacity {
        max_payload: 65_000,
        bert: true,
        whole_fits: true,
    };
    const UDP: Capacity = Capacity {
        max_payload: 1024,
        bert: false,
        whole_fits: false,
    };

    fn b(num: u64, szx: u8) -> Option<Block> {
        Some(Block {
            num,
            more: false,
            szx,
        })
    }

    #[test]
    fn option_value_round_trip() {
        let blk = Block {
            num: 5,
            more: true,
            szx: 6,
        };
        assert_eq!(blk.encode(), 0x5e);
        assert_eq!(Block::decode(&[0x5e]), Some(blk));
        assert_eq!(Block::decode(&[1, 2, 3, 4]), None);
    }

    #[test]
    fn unblocked_requests() {
        assert_eq!(
            plan(1000, None, TCP_1152).unwrap(),
            Plan {
                offset: 0,
                len: 1000,
                block: None
            }
        );
        let p = plan(5000, None, TCP_1152).unwrap();
        assert_eq!(
            p,
            Plan {
                offset: 0,
                len: 1024,
                block: Some(Block {
                    num: 0,
                    more: true,
                    szx: 6
                })
            }
        );
        // BERT: the largest multiple of 1024 that fits.
        let p = plan(1 << 20, None, TCP_BERT).unwrap();
        assert_eq!(p.len, 63 * 1024);
        assert_eq!(
            p.block,
            Some(Block {
                num: 0,
                more: true,
                szx: 7
            })
        );
        assert_eq!(plan(60_000, None, TCP_BERT).unwrap().block, None);
        // UDP never sends more than one block unblocked.
        assert_eq!(plan(1024, None, UDP).unwrap().block, None);
        assert_eq!(
            plan(1025, None, UDP).unwrap().block,
            Some(Block {
                num: 0,
                more: true,
                szx: 6
            })
        );
    }

    #[test]
    fn requested_blocks() {
        let p = plan(5000, b(4, 6), TCP_1152).unwrap();
        assert_eq!(
            p,
            Plan {
                offset: 4096,
                len: 904,
                block: Some(Block {
                    num: 4,
                    more: false,
                    szx: 6
                })
            }
        );
        let p = plan(5000, b(3, 4), UDP).unwrap();
        assert_eq!(
            p,
            Plan {
                offset: 768,
                len: 256,
                block: Some(Block {
                    num: 3,
                    more: true,
                    szx: 4
                })
            }
        );
        // BERT continues at NUM in KiB units.
        let p = plan(200_000, b(63, 7), TCP_BERT).unwrap();
        assert_eq!(p.offset, 63 * 1024);
        assert_eq!(p.len, 63 * 1024);
        assert_eq!(
            p.block,
            Some(Block {
                num: 63,
                more: true,
                szx: 7
            })
        );
        let p = plan(200_000, b(189, 7), TCP_BERT).unwrap();
        assert_eq!(p.len, 200_000 - 189 * 1024);
        assert!(!p.block.unwrap().more);
    }

    #[test]
    fn late_negotiation_and_errors() {
        // 1024-byte blocks do not fit a 600-byte budget: 512 instead, NUM rescaled.
        let small = Capacity {
            max_payload: 600,
            bert: false,
            whole_fits: true,
        };
        let p = plan(5000, b(1, 6), small).unwrap();
        assert_eq!(
            p,
            Plan {
                offset: 1024,
                len: 512,
                block: Some(Block {
                    num: 2,
                    more: true,
                    szx: 5
                })
            }
        );
        assert_eq!(plan(5000, b(5, 6), TCP_1152), Err(BlockError::BeyondEnd));
        assert_eq!(plan(5000, b(0, 7), UDP), Err(BlockError::BertNotNegotiated));
        assert_eq!(plan(0, b(0, 6), UDP).unwrap().len, 0);
    }
}
