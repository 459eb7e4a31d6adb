//! CoAP resources, the same for every transport: `GET /fw/{name}` block-wise and
//! `GET /.well-known/core`. A request becomes one response; no state is kept between blocks
//! (libcoap uses a new token per block), so transfers are keyed on nothing at all.

use std::sync::Arc;

use bytes::Bytes;

use super::block::{self, Block, BlockError, Capacity};
use super::msg::{codes, format, is_critical, opt, Message};
use crate::firmware::Repository;
use crate::metrics::Metrics;
use crate::name::FirmwareName;

/// Options this server understands; an unknown critical option gets 4.02 (RFC 7252 §5.4.1).
const KNOWN: [u16; 9] = [
    opt::URI_HOST,
    opt::URI_PORT,
    opt::URI_PATH,
    opt::URI_QUERY,
    opt::ACCEPT,
    opt::BLOCK2,
    opt::BLOCK1,
    opt::SIZE2,
    opt::OBSERVE,
];

/// Room for our header, token and options in a response: Len with 4-byte extension (5),
/// code (1), token (8), ETag (9), Content-Format (2), Block2 (4), Size2 (5), marker (1).
pub const RESPONSE_OVERHEAD: u64 = 40;

const WELL_KNOWN_CORE: &str = "</fw>;rt=\"firmware\";ct=42;title=\"GET /fw/{name}\"";

/// What every CoAP listener shares.
pub struct CoapContext {
    pub repo: Arc<Repository>,
    pub metrics: Arc<Metrics>,
}

/// Answers `req` (a request: class 0) with a response carrying the same token.
pub async fn handle(ctx: &CoapContext, req: &Message, cap: Capacity) -> Message {
    let mut resp = Message::new(codes::CONTENT, req.token.clone());
    if let Some((n, _)) = req
        .options
        .iter()
        .find(|(n, _)| is_critical(*n) && !KNOWN.contains(n))
    {
        return error(
            req,
            codes::BAD_OPTION,
            &format!("unknown critical option {n}"),
        );
    }
    if req.code != codes::GET {
        return error(req, codes::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let path = req.path();
    if path == ".well-known/core" {
        resp.push_uint(opt::CONTENT_FORMAT, format::LINK_FORMAT as u64);
        resp.payload = Bytes::from_static(WELL_KNOWN_CORE.as_bytes());
        return resp;
    }
    let Some(name) = path.strip_prefix("fw/") else {
        return error(req, codes::NOT_FOUND, "no such resource");
    };
    if let Some(accept) = req.uint_option(opt::ACCEPT) {
        if accept != format::OCTET_STREAM as u64 {
            return error(
                req,
                codes::NOT_ACCEPTABLE,
                "firmware is application/octet-stream (42)",
            );
        }
    }
    let requested = match req.option(opt::BLOCK2) {
        None => None,
        Some(v) => match Block::decode(v) {
            Some(b) => Some(b),
            None => return error(req, codes::BAD_OPTION, &BlockError::Malformed.to_string()),
        },
    };
    let name = match FirmwareName::parse(name) {
        Ok(n) => n,
        Err(e) => return error(req, codes::NOT_FOUND, &e.to_string()),
    };
    let record = match ctx.repo.resolve(&name).await {
        Ok(r) => r,
        Err(e) => return domain_error(req, e),
    };
    let plan = match block::plan(record.size, requested, cap) {
        Ok(p) => p,
        Err(e) => return error(req, codes::BAD_OPTION, &e.to_string()),
    };
    let payload = match ctx
        .repo
        .read_bytes(&record, plan.offset..plan.offset + plan.len)
        .await
    {
        Ok(b) => b,
        Err(e) => return domain_error(req, e),
    };
    ctx.metrics.served(payload.len() as u64);
    // The ETag option holds 8 bytes: the digest's first 8, decoded without allocating.
    let mut etag = [0u8; 8];
    let _ = hex::decode_to_slice(&record.sha256.as_bytes()[..16], &mut etag);
    resp.push(opt::ETAG, Bytes::copy_from_slice(&etag));
    resp.push_uint(opt::CONTENT_FORMAT, format::OCTET_STREAM as u64);
    if let Some(b) = plan.block {
        resp.push_uint(opt::BLOCK2, b.encode());
        if b.num == 0 || req.option(opt::SIZE2).is_some() {
            resp.push_uint(opt::SIZE2, record.size);
        }
    } else if req.option(opt::SIZE2).is_some() {
        resp.push_uint(opt::SIZE2, record.size);
    }
    resp.payload = payload;
    resp
}

fn domain_error(req: &Message, e: crate::firmware::FirmwareError) -> Message {
    let (_, kind) = e.code();
    let text = if kind.is_client_error() {
        e.to_string()
    } else {
        tracing::error!(error = %e, "CoAP request failed");
        "storage is unavailable".to_owned()
    };
    error(req, kind.coap_code(), &text)
}

/// An error response with a diagnostic payload (RFC 7252 §5.5.2).
pub fn error(req: &Message, code: u8, diagnostic: &str) -> Message {
    let mut m = Message::new(code, req.token.clone());
    m.payload = Bytes::copy_from_slice(diagnostic.as_bytes());
    m
}
