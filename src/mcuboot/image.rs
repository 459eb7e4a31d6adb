//! The bytes of an MCUboot image as `imgtool sign` lays them out: header, body, protected TLVs
//! (SEC_CNT), then the TLV area (hash, SIG_PURE, KEYHASH, ED25519), then the optional padding
//! and trailer up to the slot size. The body stays in a spooled file: it is read once to hash,
//! twice more for a pure signature, and streamed into the repository from there.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use bytes::Bytes;
use ed25519_dalek::hazmat::{raw_sign_byupdate, ExpandedSecretKey};
use ed25519_dalek::Signer;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256, Sha512};

use super::{HashMode, ImageVersion, McubootError, McubootInfo, McubootOptions};
use crate::keys::KeyEntry;

const IMAGE_MAGIC: u32 = 0x96f3_b83d;
const TLV_INFO_MAGIC: u16 = 0x6907;
const TLV_PROT_INFO_MAGIC: u16 = 0x6908;
const TLV_KEYHASH: u8 = 0x01;
const TLV_SHA256: u8 = 0x10;
const TLV_SHA512: u8 = 0x12;
const TLV_ED25519: u8 = 0x24;
const TLV_SIG_PURE: u8 = 0x25;
const TLV_SEC_CNT: u8 = 0x50;
/// Flash reads back 0xff where nothing was written (imgtool's default `--erased-val`).
const ERASED: u8 = 0xff;
/// imgtool's default `--max-sectors`: the swap status area is sized for this many sectors.
const MAX_SECTORS: u64 = 128;
/// The boot magic for `max_align` 8 (MCUboot's `BOOT_MAGIC_GOOD`).
const BOOT_MAGIC: [u8; 16] = [
    0x77, 0xc2, 0x95, 0xf3, 0x60, 0xd2, 0xef, 0x7f, 0x35, 0x52, 0x50, 0x0f, 0x2c, 0xb6, 0x79, 0x80,
];
/// The tail of the boot magic for larger alignments, after the two alignment bytes.
const BOOT_MAGIC_ALIGNED_TAIL: [u8; 14] = [
    0x2d, 0xe1, 0x5d, 0x29, 0x41, 0x0b, 0x8d, 0x77, 0x67, 0x9c, 0x11, 0x0f, 0x1f, 0x8a,
];
const CHUNK: usize = 64 * 1024;

/// Everything but the body, computed before a byte is stored.
pub struct Plan {
    /// Header and the header area's fill, `header_size` bytes.
    head: Vec<u8>,
    /// Where the body starts in the spooled file (past a zeroed header area when not padded).
    body_offset: u64,
    body_len: u64,
    /// Protected TLVs and the TLV area.
    tlvs: Vec<u8>,
    /// Erased bytes between the TLVs and the trailer.
    padding: u64,
    /// The trailer: erased status area, image_ok, boot magic.
    trailer: Vec<u8>,
    pub info: McubootInfo,
}

impl Plan {
    /// Length of the whole image.
    pub fn len(&self) -> u64 {
        self.head.len() as u64
            + self.body_len
            + self.tlvs.len() as u64
            + self.padding
            + self.trailer.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image's bytes in order, the body read from `spool` in 64 KiB parts.
    pub async fn stream(
        self,
        spool: &Path,
    ) -> std::io::Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut file = tokio::fs::File::open(spool).await?;
        file.seek(SeekFrom::Start(self.body_offset)).await?;
        let body = tokio_util::io::ReaderStream::with_capacity(file.take(self.body_len), CHUNK);
        let padding = futures_util::stream::unfold(self.padding, |left| async move {
            (left > 0).then(|| {
                let n = left.min(CHUNK as u64);
                (Ok(Bytes::from(vec![ERASED; n as usize])), left - n)
            })
        });
        let head = futures_util::stream::iter([Ok(Bytes::from(self.head))]);
        let tlvs = futures_util::stream::iter([Ok(Bytes::from(self.tlvs))]);
        let trailer = futures_util::stream::iter([Ok(Bytes::from(self.trailer))]);
        Ok(head
            .chain(body)
            .chain(tlvs)
            .chain(padding)
            .chain(trailer)
            .filter(|part| std::future::ready(!matches!(part, Ok(b) if b.is_empty()))))
    }
}

fn align_up(n: u64, align: u64) -> u64 {
    (n + align - 1) & !(align - 1)
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.extend_from_slice(&[kind, 0]);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
}

/// Wraps entries in a TLV info header (magic, total length including the header).
fn tlv_area(magic: u16, entries: &[u8]) -> Vec<u8> {
    if entries.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(4 + entries.len());
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&((4 + entries.len()) as u16).to_le_bytes());
    out.extend_from_slice(entries);
    out
}

/// Feeds the signed region (head, body, protected TLVs) to `sink`, reading the body from disk.
fn feed(spool: &mut File, r: &Region<'_>, sink: &mut dyn FnMut(&[u8])) -> std::io::Result<()> {
    sink(r.head);
    spool.seek(SeekFrom::Start(r.body_offset))?;
    let mut left = r.body_len;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        spool.read_exact(&mut buf[..want])?;
        sink(&buf[..want]);
        left -= want as u64;
    }
    sink(r.protected);
    Ok(())
}

/// The signed region: header area, the body in the spool, protected TLVs.
struct Region<'a> {
    head: &'a [u8],
    body_offset: u64,
    body_len: u64,
    protected: &'a [u8],
}

/// The region's digest and the public key's, with `D`.
fn hashes<D: Digest>(
    file: &mut File,
    r: &Region<'_>,
    public: &[u8],
) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut h = D::new();
    feed(file, r, &mut |b| h.update(b))?;
    Ok((h.finalize().to_vec(), D::digest(public).to_vec()))
}

/// Size of the trailer MCUboot's swap upgrade needs (imgtool's `_trailer_size`, no encryption).
fn trailer_size(align: u64, max_align: u64) -> u64 {
    MAX_SECTORS * 3 * align + max_align * 4 + align_up(16, max_align)
}

fn trailer(size: u64, max_align: u64, confirm: bool) -> Vec<u8> {
    let mut t = vec![ERASED; size as usize];
    let magic: Vec<u8> = if max_align == 8 {
        BOOT_MAGIC.to_vec()
    } else {
        let mut m = (max_align as u16).to_le_bytes().to_vec();
        m.extend_from_slice(&BOOT_MAGIC_ALIGNED_TAIL);
        m
    };
    let start = t.len() - magic.len();
    t[start..].copy_from_slice(&magic);
    if confirm {
        // image_ok sits one max_align unit before the aligned magic.
        let at = t.len() - (align_up(16, max_align) + max_align) as usize;
        t[at] = 0x01;
    }
    t
}

/// Checks the spooled body against `options`, hashes and signs it with `key`, and returns
/// the layout to stream. Blocking: run it on the blocking pool.
pub fn plan(
    spool: &Path,
    options: McubootOptions,
    version: ImageVersion,
    key: &KeyEntry,
) -> Result<Plan, McubootError> {
    let mut file = File::open(spool)?;
    let spooled = file.metadata()?.len();
    let header_size = options.header_size;
    let (fill, body_offset) = if options.pad_header {
        (ERASED, 0)
    } else {
        // The build left room for the header: it must be zeros, or the header would
        // overwrite code.
        let mut area = vec![0u8; header_size as usize];
        if spooled < header_size
            || file.read_exact(&mut area).is_err()
            || area.iter().any(|&b| b != 0)
        {
            return Err(McubootError::HeaderOverlap { header_size });
        }
        (0, header_size)
    };
    let body_len = spooled - body_offset;
    let img_size = u32::try_from(body_len).map_err(|_| McubootError::BodyTooLarge(body_len))?;

    let mut protected_entries = Vec::new();
    if let Some(counter) = options.security_counter {
        tlv(&mut protected_entries, TLV_SEC_CNT, &counter.to_le_bytes());
    }
    let protected = tlv_area(TLV_PROT_INFO_MAGIC, &protected_entries);

    let mut head = Vec::with_capacity(header_size as usize);
    head.extend_from_slice(&IMAGE_MAGIC.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes()); // load address
    head.extend_from_slice(&(header_size as u16).to_le_bytes());
    head.extend_from_slice(&(protected.len() as u16).to_le_bytes());
    head.extend_from_slice(&img_size.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes()); // flags
    head.push(version.major);
    head.push(version.minor);
    head.extend_from_slice(&version.revision.to_le_bytes());
    head.extend_from_slice(&version.build.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes()); // pad1
    head.resize(header_size as usize, fill);

    let public = key.spki_der();
    let region = Region {
        head: &head,
        body_offset,
        body_len,
        protected: &protected,
    };
    // The image hash and KEYHASH use the same algorithm (imgtool hashes the key with it).
    let (hash_tlv, (digest, key_hash)) = match options.hash {
        HashMode::Sha256 => (TLV_SHA256, hashes::<Sha256>(&mut file, &region, &public)?),
        HashMode::Sha512 | HashMode::Pure => {
            (TLV_SHA512, hashes::<Sha512>(&mut file, &region, &public)?)
        }
    };
    let signature = match options.hash {
        HashMode::Pure => sign_region(&mut file, key, &region)?,
        _ => key.signing.sign(&digest).to_bytes(),
    };

    let mut entries = Vec::new();
    tlv(&mut entries, hash_tlv, &digest);
    if options.hash == HashMode::Pure {
        tlv(&mut entries, TLV_SIG_PURE, &[1]);
    }
    tlv(&mut entries, TLV_KEYHASH, &key_hash);
    tlv(&mut entries, TLV_ED25519, &signature);
    let mut tlvs = protected;
    tlvs.extend_from_slice(&tlv_area(TLV_INFO_MAGIC, &entries));

    let image = header_size + body_len + tlvs.len() as u64;
    let max_align = options.align.max(8);
    let (padding, trailer) = match options.slot_size {
        Some(slot) if slot > 0 => {
            let tsize = trailer_size(options.align, max_align);
            if image + tsize > slot {
                return Err(McubootError::SlotTooSmall {
                    image,
                    trailer: tsize,
                    slot,
                });
            }
            if options.pad {
                (
                    slot - image - tsize,
                    trailer(tsize, max_align, options.confirm),
                )
            } else {
                (0, Vec::new())
            }
        }
        _ => (0, Vec::new()),
    };
    Ok(Plan {
        head,
        body_offset,
        body_len,
        tlvs,
        padding,
        trailer,
        info: McubootInfo {
            options,
            key_id: key.id.clone(),
            image_hash: hex::encode(&digest),
        },
    })
}

/// Pure Ed25519 over the whole signed region without holding it in memory: the message is
/// fed to the signer twice (nonce, then challenge), each time read from the spool.
fn sign_region(file: &mut File, key: &KeyEntry, r: &Region<'_>) -> Result<[u8; 64], McubootError> {
    let file = std::cell::RefCell::new(file);
    let failure = std::cell::RefCell::new(None);
    let esk = ExpandedSecretKey::from(&key.signing.to_bytes());
    let signed = raw_sign_byupdate::<ed25519_dalek::Sha512, _>(
        &esk,
        |h| {
            let mut file = file.borrow_mut();
            feed(&mut file, r, &mut |b| ed25519_dalek::Digest::update(h, b)).map_err(|e| {
                *failure.borrow_mut() = Some(e);
                ed25519_dalek::SignatureError::new()
            })
        },
        &key.verifying(),
    );
    match (signed, failure.into_inner()) {
        (_, Some(e)) => Err(e.into()),
        (Ok(sig), None) => Ok(sig.to_bytes()),
        (Err(e), None) => Err(McubootError::Io(std::io::Error::other(e.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_matches_imgtool_layout() {
        // align 4, max_align 8: 128*3*4 status + 4*8 flags + 16 magic.
        assert_eq!(trailer_size(4, 8), 1536 + 32 + 16);
        let t = trailer(trailer_size(4, 8), 8, true);
        assert_eq!(&t[t.len() - 16..], &BOOT_MAGIC);
        assert_eq!(t[t.len() - 24], 0x01);
        assert!(t[..t.len() - 24].iter().all(|&b| b == ERASED));
        let t = trailer(trailer_size(32, 32), 32, false);
        assert_eq!(&t[t.len() - 16..t.len() - 14], &[32, 0]);
        assert_eq!(trailer_size(32, 32), 128 * 3 * 32 + 128 + 32);
    }

    #[test]
    fn tlv_area_counts_its_own_header() {
        let mut e = Vec::new();
        tlv(&mut e, TLV_SEC_CNT, &7u32.to_le_bytes());
        assert_eq!(
            tlv_area(TLV_PROT_INFO_MAGIC, &e),
            [0x08, 0x69, 12, 0, 0x50, 0, 4, 0, 7, 0, 0, 0]
        );
        assert!(tlv_area(TLV_INFO_MAGIC, &[]).is_empty());
    }
}
