//! CoAP over UDP parser: arbitrary datagrams must never panic, and every datagram it accepts
//! must survive encode-then-parse unchanged.
#![no_main]

use fwrepo::coap::udp::{encode, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = parse(data) {
        let back = parse(&encode(&d)).expect("our own encoding parses");
        assert_eq!(back, d);
    }
});
