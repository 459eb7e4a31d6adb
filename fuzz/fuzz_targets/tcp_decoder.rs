//! CoAP over TCP decoder: arbitrary bytes must never panic, never allocate past the frame
//! limit, and every frame it accepts must survive encode-then-decode unchanged.
#![no_main]

use bytes::BytesMut;
use fwrepo::coap::tcp_codec::{encode_to_vec, TcpCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = TcpCodec::new(8192);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = codec.decode(&mut buf) {
        let wire = encode_to_vec(&msg);
        let mut again = BytesMut::from(&wire[..]);
        let back = TcpCodec::new(usize::MAX).decode(&mut again).unwrap().unwrap();
        assert_eq!(back, msg);
    }
});
