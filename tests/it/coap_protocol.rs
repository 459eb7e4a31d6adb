//! CoAP protocol behaviour, frame by frame over real sockets: CSM first, Ping/Pong, Abort on
//! malformed input, error codes, block options and the peer's Max-Message-Size; over UDP the
//! reply cache, message types and pings.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use fwrepo::coap::block::Block;
use fwrepo::coap::msg::{codes, opt, Message};
use fwrepo::coap::tcp_codec::{encode_to_vec, TcpCodec};
use fwrepo::coap::udp::{self, Datagram, MsgType};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Framed;

use crate::common::{client, image, sha256_hex, TestServer};

pub type Conn = Framed<tokio::net::TcpStream, TcpCodec>;

pub async fn recv(c: &mut Conn) -> Message {
    tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a message in time")
        .expect("connection open")
        .expect("well formed")
}

/// Connects, checks the server's CSM arrives first, and sends ours.
pub async fn connect(srv: &TestServer, max_message_size: u64, bert: bool) -> Conn {
    let s = tokio::net::TcpStream::connect(srv.coap_tcp.unwrap())
        .await
        .unwrap();
    let mut c = Framed::new(s, TcpCodec::new(1 << 20));
    let csm = recv(&mut c).await;
    assert_eq!(csm.code, codes::CSM, "the server speaks first with its CSM");
    assert_eq!(csm.uint_option(2), Some(8192), "Max-Message-Size");
    assert!(csm.option(4).is_some(), "Block-Wise-Transfer");
    let mut ours = Message::new(codes::CSM, Bytes::new());
    ours.push_uint(2, max_message_size);
    if bert {
        ours.push(4, Bytes::new());
    }
    c.send(&ours).await.unwrap();
    c
}

pub fn get(token: &'static [u8], path: &str) -> Message {
    let mut m = Message::new(codes::GET, Bytes::from_static(token));
    for seg in path.split('/') {
        m.push(opt::URI_PATH, Bytes::copy_from_slice(seg.as_bytes()));
    }
    m
}

async fn server_with(data: &[u8]) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let r = srv.put("/v1/firmware/img", data.to_vec()).await;
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    (dir, srv)
}

#[tokio::test]
async fn ping_pong_release_and_empty_messages() {
    let (_d, srv) = server_with(b"x").await;
    let mut c = connect(&srv, 1152, false).await;
    c.send(&Message::new(codes::EMPTY, Bytes::new()))
        .await
        .unwrap(); // ignored
    c.send(&Message::new(codes::PING, Bytes::from_static(b"\x42\x43")))
        .await
        .unwrap();
    let pong = recv(&mut c).await;
    assert_eq!(pong.code, codes::PONG);
    assert_eq!(&pong.token[..], b"\x42\x43");
    c.send(&Message::new(codes::RELEASE, Bytes::new()))
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .unwrap();
    assert!(end.is_none(), "connection closed after Release");
    srv.stop().await;
}

#[tokio::test]
async fn a_request_before_the_csm_is_aborted() {
    let (_d, srv) = server_with(b"x").await;
    let s = tokio::net::TcpStream::connect(srv.coap_tcp.unwrap())
        .await
        .unwrap();
    let mut c = Framed::new(s, TcpCodec::new(1 << 20));
    assert_eq!(recv(&mut c).await.code, codes::CSM);
    // An Empty message is ignored whenever it comes; a request first is a connection error.
    c.send(&Message::new(codes::EMPTY, Bytes::new()))
        .await
        .unwrap();
    c.send(&get(b"\x01", "fw/img")).await.unwrap();
    let abort = recv(&mut c).await;
    assert_eq!(abort.code, codes::ABORT);
    assert!(
        String::from_utf8_lossy(&abort.payload).contains("CSM"),
        "{:?}",
        abort.payload
    );
    let end = tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .unwrap();
    assert!(end.is_none(), "closed after Abort");
    // With the CSM first, the same request is served.
    let mut c = connect(&srv, 1152, false).await;
    c.send(&get(b"\x01", "fw/img")).await.unwrap();
    assert_eq!(recv(&mut c).await.code, codes::CONTENT);
    srv.stop().await;
}

#[tokio::test]
async fn malformed_frame_gets_abort_and_close() {
    let (_d, srv) = server_with(b"x").await;
    let mut c = connect(&srv, 1152, false).await;
    // TKL 9 is reserved.
    c.get_mut().write_all(&[0x09, 0x01]).await.unwrap();
    let abort = recv(&mut c).await;
    assert_eq!(abort.code, codes::ABORT);
    assert!(
        String::from_utf8_lossy(&abort.payload).contains("token length"),
        "{:?}",
        abort.payload
    );
    assert!(tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .unwrap()
        .is_none());

    // A frame larger than our Max-Message-Size is refused from its header.
    let mut c = connect(&srv, 1152, false).await;
    c.get_mut()
        .write_all(&[0xf0, 0x00, 0x10, 0x00, 0x00, 0x01])
        .await
        .unwrap();
    assert_eq!(recv(&mut c).await.code, codes::ABORT);
    srv.stop().await;
}

#[tokio::test]
async fn error_codes() {
    let (_d, srv) = server_with(&image(5000, 1)).await;
    let mut c = connect(&srv, 1152, false).await;
    let cases: Vec<(Message, u8)> = vec![
        (get(b"\x01", "fw/nope"), codes::NOT_FOUND),
        (get(b"\x02", "other"), codes::NOT_FOUND),
        (
            {
                let mut m = get(b"\x03", "fw/img");
                m.code = codes::POST;
                m
            },
            codes::METHOD_NOT_ALLOWED,
        ),
        (
            {
                let mut m = get(b"\x04", "fw/img");
                m.push(2049, Bytes::from_static(b"x")); // unknown critical option
                m
            },
            codes::BAD_OPTION,
        ),
        (
            {
                let mut m = get(b"\x05", "fw/img");
                m.push_uint(
                    opt::BLOCK2,
                    Block {
                        num: 5,
                        more: false,
                        szx: 6,
                    }
                    .encode(),
                ); // beyond the end
                m
            },
            codes::BAD_OPTION,
        ),
        (
            {
                let mut m = get(b"\x06", "fw/img");
                m.push_uint(
                    opt::BLOCK2,
                    Block {
                        num: 0,
                        more: false,
                        szx: 7,
                    }
                    .encode(),
                ); // BERT not negotiated
                m
            },
            codes::BAD_OPTION,
        ),
        (
            {
                let mut m = get(b"\x07", "fw/img");
                m.push_uint(opt::ACCEPT, 50);
                m
            },
            codes::NOT_ACCEPTABLE,
        ),
    ];
    for (req, want) in cases {
        c.send(&req).await.unwrap();
        let resp = recv(&mut c).await;
        assert_eq!(resp.token, req.token);
        assert_eq!(resp.code, want, "token {:?}: {:?}", req.token, resp.payload);
        assert!(!resp.payload.is_empty(), "diagnostic payload");
    }
    // Uri-Host and Uri-Port (libcoap sends them) are accepted.
    let mut m = get(b"\x08", "fw/img");
    m.push(opt::URI_HOST, Bytes::from_static(b"127.0.0.1"));
    m.push_uint(opt::URI_PORT, 5683);
    c.send(&m).await.unwrap();
    assert_eq!(recv(&mut c).await.code, codes::CONTENT);
    srv.stop().await;
}

#[tokio::test]
async fn well_known_core() {
    let (_d, srv) = server_with(b"x").await;
    let mut c = connect(&srv, 1152, false).await;
    c.send(&get(b"\x01", ".well-known/core")).await.unwrap();
    let r = recv(&mut c).await;
    assert_eq!(r.code, codes::CONTENT);
    assert_eq!(r.uint_option(opt::CONTENT_FORMAT), Some(40));
    assert!(String::from_utf8_lossy(&r.payload).starts_with("</fw>"));
    srv.stop().await;
}

/// Fetches the whole image block by block with a fresh token each time (as libcoap does),
/// checking the options of every block and that no frame exceeds the announced limit.
async fn fetch_blocks(c: &mut Conn, szx: u8, limit: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut num = 0u64;
    let mut etag: Option<Bytes> = None;
    loop {
        let token: &'static [u8] = Box::leak(vec![(num % 250) as u8, 7].into_boxed_slice());
        let mut req = get(token, "fw/img");
        req.push_uint(
            opt::BLOCK2,
            Block {
                num,
                more: false,
                szx,
            }
            .encode(),
        );
        c.send(&req).await.unwrap();
        let r = recv(c).await;
        assert_eq!(r.code, codes::CONTENT);
        assert!(
            encode_to_vec(&r).len() <= limit,
            "frame over the peer's Max-Message-Size"
        );
        assert_eq!(r.uint_option(opt::CONTENT_FORMAT), Some(42));
        let tag = r.option(opt::ETAG).expect("ETag on every block").clone();
        assert_eq!(tag.len(), 8);
        assert_eq!(*etag.get_or_insert(tag.clone()), tag);
        let b = Block::decode(r.option(opt::BLOCK2).expect("Block2")).unwrap();
        assert_eq!(b.num, num);
        if num == 0 {
            assert_eq!(
                r.uint_option(opt::SIZE2),
                Some(size as u64),
                "Size2 on the first block"
            );
        }
        out.extend_from_slice(&r.payload);
        if !b.more {
            return out;
        }
        num += if b.szx == 7 {
            (r.payload.len() / 1024) as u64
        } else {
            1
        };
    }
}

#[tokio::test]
async fn block_wise_and_bert_respect_limits() {
    let data = image(300_000, 2);
    let (_d, srv) = server_with(&data).await;
    let want = sha256_hex(&data);
    let mut c = connect(&srv, 1152, false).await;
    assert_eq!(
        sha256_hex(&fetch_blocks(&mut c, 6, 1152, data.len()).await),
        want
    );
    assert_eq!(
        sha256_hex(&fetch_blocks(&mut c, 2, 1152, data.len()).await),
        want
    );
    let mut c = connect(&srv, 20_000, true).await;
    assert_eq!(
        sha256_hex(&fetch_blocks(&mut c, 7, 20_000, data.len()).await),
        want
    );

    // No Block2 and a peer limit the image fits in: one response carries it all.
    let mut c = connect(&srv, 400_000, false).await;
    c.send(&get(b"\x09", "fw/img")).await.unwrap();
    let r = recv(&mut c).await;
    assert!(r.option(opt::BLOCK2).is_none());
    assert_eq!(sha256_hex(&r.payload), want);
    srv.stop().await;
}

async fn udp_exchange(sock: &tokio::net::UdpSocket, d: &Datagram) -> Datagram {
    sock.send(&udp::encode(d)).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    udp::parse(&buf[..n]).unwrap()
}

/// The Echo option (RFC 9175).
const ECHO: u16 = 252;

/// Proves the socket's address to the server: the first request is answered 4.01 with an Echo
/// value, and the same request with it is served.
async fn verify_address(sock: &tokio::net::UdpSocket) {
    let first = Datagram {
        mtype: MsgType::Con,
        message_id: 0x0100,
        msg: get(b"\x09", ".well-known/core"),
    };
    let challenge = udp_exchange(sock, &first).await;
    assert_eq!(challenge.msg.code, codes::UNAUTHORIZED);
    let mut again = first.clone();
    again.message_id = 0x0101;
    again
        .msg
        .push(ECHO, challenge.msg.option(ECHO).unwrap().clone());
    assert_eq!(udp_exchange(sock, &again).await.msg.code, codes::CONTENT);
}

#[tokio::test]
async fn udp_amplification_is_limited_until_the_address_is_verified() {
    let data = image(3000, 3);
    let (_d, srv) = server_with(&data).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(srv.coap_udp.unwrap()).await.unwrap();
    let request = Datagram {
        mtype: MsgType::Con,
        message_id: 0x0001,
        msg: get(b"\x01\x02", "fw/img"),
    };
    let sent = udp::encode(&request).len();
    sock.send(&udp::encode(&request)).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let challenge = udp::parse(&buf[..n]).unwrap();
    assert_eq!(challenge.msg.code, codes::UNAUTHORIZED);
    assert!(challenge.msg.payload.is_empty());
    let echo = challenge.msg.option(ECHO).expect("an Echo value").clone();
    assert!(n <= 3 * sent, "{n} bytes answered to {sent}");
    eprintln!(
        "UDP amplification toward an unverified address: {sent} bytes in, {n} out ({:.1}x)",
        n as f64 / sent as f64
    );
    // Someone else's Echo value does not verify this address.
    let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    other.connect(srv.coap_udp.unwrap()).await.unwrap();
    let mut borrowed = request.clone();
    borrowed.msg.push(ECHO, echo.clone());
    assert_eq!(
        udp_exchange(&other, &borrowed).await.msg.code,
        codes::UNAUTHORIZED
    );
    // With its own Echo value the request is served, and so is the next without it.
    let mut proved = request.clone();
    proved.message_id = 0x0002;
    proved.msg.push(ECHO, echo);
    let served = udp_exchange(&sock, &proved).await;
    assert_eq!(served.msg.code, codes::CONTENT);
    assert_eq!(&served.msg.payload[..], &data[..1024]);
    let mut next = request.clone();
    next.message_id = 0x0003;
    assert_eq!(udp_exchange(&sock, &next).await.msg.code, codes::CONTENT);
    // A request too small to answer within three times its size gets nothing.
    let bare = Datagram {
        mtype: MsgType::Con,
        message_id: 0x0004,
        msg: Message::new(codes::GET, Bytes::new()),
    };
    other.send(&udp::encode(&bare)).await.unwrap();
    let silent = tokio::time::timeout(Duration::from_millis(500), other.recv(&mut buf)).await;
    assert!(silent.is_err(), "a 4-byte request was answered");
    srv.stop().await;

    // Turned off (a trusted network), the first request is served at once.
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &["coap.udp_verify_peers=false"]).await;
    let r = srv.put("/v1/firmware/img", data.clone()).await;
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(srv.coap_udp.unwrap()).await.unwrap();
    assert_eq!(udp_exchange(&sock, &request).await.msg.code, codes::CONTENT);
    srv.stop().await;
}

#[tokio::test]
async fn udp_piggyback_non_ping_and_reply_cache() {
    let data = image(3000, 3);
    let (_d, srv) = server_with(&data).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(srv.coap_udp.unwrap()).await.unwrap();
    verify_address(&sock).await;

    let con = Datagram {
        mtype: MsgType::Con,
        message_id: 0x1234,
        msg: get(b"\x01", "fw/img"),
    };
    let ack = udp_exchange(&sock, &con).await;
    assert_eq!(ack.mtype, MsgType::Ack);
    assert_eq!(ack.message_id, 0x1234);
    assert_eq!(ack.msg.code, codes::CONTENT);
    let b = Block::decode(ack.msg.option(opt::BLOCK2).unwrap()).unwrap();
    assert_eq!((b.num, b.more, b.szx), (0, true, 6));
    assert_eq!(&ack.msg.payload[..], &data[..1024]);

    // The server has forgotten nothing: deleting the image must not change a retransmitted
    // answer, which comes from the reply cache.
    client()
        .delete(srv.url("/v1/firmware/img"))
        .send()
        .await
        .unwrap();
    let again = udp_exchange(&sock, &con).await;
    assert_eq!(again, ack);
    let fresh = Datagram {
        mtype: MsgType::Con,
        message_id: 0x1235,
        msg: get(b"\x02", "fw/img"),
    };
    assert_eq!(udp_exchange(&sock, &fresh).await.msg.code, codes::NOT_FOUND);

    let non = Datagram {
        mtype: MsgType::Non,
        message_id: 0x2000,
        msg: get(b"\x03", ".well-known/core"),
    };
    let r = udp_exchange(&sock, &non).await;
    assert_eq!(r.mtype, MsgType::Non);
    assert_eq!(r.msg.code, codes::CONTENT);

    let ping = Datagram {
        mtype: MsgType::Con,
        message_id: 0x3000,
        msg: Message::default(),
    };
    let rst = udp_exchange(&sock, &ping).await;
    assert_eq!((rst.mtype, rst.message_id), (MsgType::Rst, 0x3000));
    srv.stop().await;
}

#[tokio::test]
async fn connection_limit_and_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(
        dir.path(),
        &["coap.max_connections=1", "coap.idle_timeout=1s"],
    )
    .await;
    let mut first = connect(&srv, 1152, false).await;
    // The second connection is over the limit: CSM, then Abort, then closed.
    let s = tokio::net::TcpStream::connect(srv.coap_tcp.unwrap())
        .await
        .unwrap();
    let mut second = Framed::new(s, TcpCodec::new(1 << 20));
    assert_eq!(recv(&mut second).await.code, codes::CSM);
    let abort = recv(&mut second).await;
    assert_eq!(abort.code, codes::ABORT);
    assert!(String::from_utf8_lossy(&abort.payload).contains("too many connections"));
    // The first, left silent, is released after the idle timeout and its slot freed.
    let release = recv(&mut first).await;
    assert_eq!(release.code, codes::RELEASE);
    assert!(tokio::time::timeout(Duration::from_secs(5), first.next())
        .await
        .unwrap()
        .is_none());
    let mut third = connect(&srv, 1152, false).await;
    third.send(&get(b"\x01", ".well-known/core")).await.unwrap();
    assert_eq!(recv(&mut third).await.code, codes::CONTENT);
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_releases_open_connections() {
    let (_d, srv) = server_with(b"x").await;
    let mut c = connect(&srv, 1152, false).await;
    let stop = tokio::spawn(srv.stop());
    assert_eq!(recv(&mut c).await.code, codes::RELEASE);
    stop.await.unwrap();
}

/// `stop` returns only once every connection has ended and the stores are closed, so the
/// same data directory opens again at once (sled takes a lock on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_at_once_after_stop_with_connections_open() {
    for round in 0..20 {
        let (dir, srv) = server_with(b"x").await;
        let mut open = Vec::new();
        for _ in 0..4 {
            let mut c = connect(&srv, 1152, false).await;
            c.send(&get(b"\x01", "fw/img")).await.unwrap();
            open.push(c);
        }
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp.connect(srv.coap_udp.unwrap()).await.unwrap();
        udp.send(&udp::encode(&Datagram {
            mtype: MsgType::Con,
            message_id: 7,
            msg: get(b"\x02", "fw/img"),
        }))
        .await
        .unwrap();
        srv.stop().await;
        let again = TestServer::start(dir.path(), &[]).await;
        assert_eq!(
            again.get("/fw/img").await.bytes().await.unwrap(),
            "x",
            "round {round}"
        );
        again.stop().await;
        drop(open);
    }
}
