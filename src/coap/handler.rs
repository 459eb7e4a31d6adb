//! CoAP resources, the same for every transport: `GET /fw/{name}` and `GET /p/{fotaId}`
//! block-wise, `GET /fota/{deviceId}` (work, JSON or CBOR), `POST /fota/{fotaId}/report`
//! (JSON or SenML JSON) and `GET /.well-known/core`. A request becomes one response; no state
//! is kept between blocks (libcoap uses a new token per block).

use std::sync::Arc;

use bytes::Bytes;

use super::block::{self, Block, BlockError, Capacity};
use super::msg::{codes, format, is_critical, opt, Message};
use crate::firmware::Repository;
use crate::fota::report::{self, MAX_REPORT};
use crate::fota::view::{work_cbor, work_json};
use crate::fota::{Engine, FotaError, Package, Proof, Work};
use crate::meta::FirmwareRecord;
use crate::metrics::Metrics;
use crate::name::FirmwareName;

/// Options this server understands; an unknown critical option gets 4.02 (RFC 7252 §5.4.1).
const KNOWN: [u16; 10] = [
    opt::URI_HOST,
    opt::URI_PORT,
    opt::URI_PATH,
    opt::URI_QUERY,
    opt::ACCEPT,
    opt::BLOCK2,
    opt::BLOCK1,
    opt::SIZE2,
    opt::OBSERVE,
    opt::CONTENT_FORMAT,
];

/// Room for our header, token and options in a response: Len with 4-byte extension (5),
/// code (1), token (8), ETag (9), Content-Format (2), Block2 (4), Size2 (5), marker (1).
pub const RESPONSE_OVERHEAD: u64 = 40;

const WELL_KNOWN_CORE: &str = concat!(
    "</fw>;rt=\"firmware\";ct=42;title=\"GET /fw/{name}\",",
    "</p>;rt=\"fota-package\";ct=42;title=\"GET /p/{fotaId}\",",
    "</fota>;rt=\"fota\";ct=\"50 60\";title=\"GET /fota/{deviceId}, POST /fota/{fotaId}/report\""
);

/// What every CoAP listener shares.
pub struct CoapContext {
    pub repo: Arc<Repository>,
    pub metrics: Arc<Metrics>,
    pub engine: Arc<Engine>,
}

/// Who sent a request: anyone (the device shows its token in the request, if any), or the
/// device a secure session was established as.
#[derive(Debug, Clone, Copy)]
pub enum Sender<'a> {
    Anyone,
    Device(&'a str),
}

impl Sender<'_> {
    fn proof<'a>(&'a self, req: &'a Message) -> Proof<'a> {
        match self {
            Sender::Device(d) => Proof::Session(d),
            Sender::Anyone => Proof::Token(query_token(req)),
        }
    }
}

/// Answers `req` (a request: class 0) from `sender` with a response carrying the same token.
pub async fn handle(
    ctx: &CoapContext,
    req: &Message,
    cap: Capacity,
    sender: Sender<'_>,
) -> Message {
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
    let segs = req.segments();
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
    match (req.code, segs.as_slice()) {
        (codes::GET, [b".well-known", b"core"]) => {
            let mut resp = Message::new(codes::CONTENT, req.token.clone());
            resp.push_uint(opt::CONTENT_FORMAT, format::LINK_FORMAT as u64);
            resp.payload = Bytes::from_static(WELL_KNOWN_CORE.as_bytes());
            resp
        }
        (codes::GET, [b"fw", _]) if ctx.engine.package_tokens() => error(
            req,
            crate::error::Kind::Unauthorized.coap_code(),
            "downloads by name need a token here; use the task's package URI",
        ),
        (codes::GET, [b"fw", name]) => {
            let Some(name) = text(name).and_then(|n| FirmwareName::parse(&n).ok()) else {
                return error(req, codes::NOT_FOUND, "no such firmware");
            };
            match ctx.repo.resolve(&name).await {
                Ok(r) => blocks(ctx, req, &r, None, cap).await,
                Err(e) => domain_error(req, e.code().1, &e),
            }
        }
        (codes::GET, [b"p", id, rest @ ..]) if rest.len() <= 1 => {
            let id = text(id).unwrap_or_default();
            let token = rest.first().map(|t| text(t).unwrap_or_default());
            match ctx.engine.package(&id, token.as_deref(), true).await {
                Ok(p) => blocks(ctx, req, &Arc::clone(&p.record), Some(&p), cap).await,
                Err(e) => domain_error(req, e.code().1, &e),
            }
        }
        (codes::GET, [b"fota", device]) => {
            work(ctx, req, &text(device).unwrap_or_default(), sender).await
        }
        (codes::POST, [b"fota", id, b"report"]) => {
            report(ctx, req, &text(id).unwrap_or_default(), sender).await
        }
        (_, [b".well-known", b"core"] | [b"fw", _] | [b"p", _] | [b"p", _, _] | [b"fota", _]) => {
            error(req, codes::METHOD_NOT_ALLOWED, "only GET is served here")
        }
        (_, [b"fota", _, b"report"]) => error(req, codes::METHOD_NOT_ALLOWED, "reports are POSTed"),
        _ => error(req, codes::NOT_FOUND, "no such resource"),
    }
}

/// One block (or the whole image) of `record`, counted to the task of `package` if any.
async fn blocks(
    ctx: &CoapContext,
    req: &Message,
    record: &FirmwareRecord,
    package: Option<&Package>,
    cap: Capacity,
) -> Message {
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
    let plan = match block::plan(record.size, requested, cap) {
        Ok(p) => p,
        Err(e) => return error(req, codes::BAD_OPTION, &e.to_string()),
    };
    let payload = match ctx
        .repo
        .read_bytes(record, plan.offset..plan.offset + plan.len)
        .await
    {
        Ok(b) => b,
        Err(e) => return domain_error(req, e.code().1, &e),
    };
    ctx.metrics.served(payload.len() as u64);
    if let Some(p) = package {
        p.served(payload.len() as u64);
    }
    let mut resp = Message::new(codes::CONTENT, req.token.clone());
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

/// `GET /fota/{deviceId}`: the work answer, or 2.05 without payload and a Max-Age saying when
/// to ask again.
async fn work(ctx: &CoapContext, req: &Message, device: &str, sender: Sender<'_>) -> Message {
    let cbor = match req.uint_option(opt::ACCEPT) {
        None => false,
        Some(f) if f == format::JSON as u64 => false,
        Some(f) if f == format::CBOR as u64 => true,
        Some(_) => {
            return error(
                req,
                codes::NOT_ACCEPTABLE,
                "work is application/json (50) or application/cbor (60)",
            )
        }
    };
    let mut resp = Message::new(codes::CONTENT, req.token.clone());
    match ctx.engine.work(device, sender.proof(req)).await {
        Ok(Work::Task { task, record }) => {
            if cbor {
                resp.push_uint(opt::CONTENT_FORMAT, format::CBOR as u64);
                resp.payload = Bytes::from(work_cbor(&task, &record));
            } else {
                resp.push_uint(opt::CONTENT_FORMAT, format::JSON as u64);
                resp.payload =
                    Bytes::from(serde_json::to_vec(&work_json(&task, &record)).unwrap_or_default());
            }
            // The answer changes with the task; it must not be reused from a cache.
            resp.push_uint(opt::MAX_AGE, 0);
        }
        Ok(Work::Nothing { retry_after }) => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            resp.push_uint(opt::MAX_AGE, secs.min(u32::MAX as u64));
        }
        Err(e) => return domain_error(req, e.code().1, &e),
    }
    resp
}

/// `POST /fota/{fotaId}/report`: 2.04 Changed when the report is taken.
async fn report(ctx: &CoapContext, req: &Message, id: &str, sender: Sender<'_>) -> Message {
    if req.option(opt::BLOCK1).is_some() || req.payload.len() > MAX_REPORT {
        return error(
            req,
            codes::REQUEST_ENTITY_TOO_LARGE,
            "a report fits one message",
        );
    }
    let parsed = match req.uint_option(opt::CONTENT_FORMAT) {
        None => report::from_json(&req.payload),
        Some(f) if f == format::JSON as u64 => report::from_json(&req.payload),
        Some(f) if f == format::SENML_JSON as u64 => report::from_senml(&req.payload),
        Some(_) => {
            return error(
                req,
                codes::UNSUPPORTED_CONTENT_FORMAT,
                "reports are application/json (50) or application/senml+json (110)",
            )
        }
    };
    let result = match parsed {
        Ok(r) => ctx.engine.report(id, &r, sender.proof(req)).await,
        Err(e) => Err(FotaError::from(e)),
    };
    match result {
        Ok(_) => Message::new(codes::CHANGED, req.token.clone()),
        Err(e) => domain_error(req, e.code().1, &e),
    }
}

/// The device token a device presents over CoAP: the Uri-Query `token=<token>`.
fn query_token(req: &Message) -> Option<&str> {
    req.options
        .iter()
        .filter(|(n, _)| *n == opt::URI_QUERY)
        .find_map(|(_, v)| std::str::from_utf8(v).ok()?.strip_prefix("token="))
}

fn domain_error(req: &Message, kind: crate::error::Kind, e: &dyn std::fmt::Display) -> Message {
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
