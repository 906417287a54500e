//! Fuzzes the connection exchange and the tcp provider's wire decoders: no input may panic, and whatever decodes must encode
//! back to the same bytes (so a decoder never accepts two spellings of one message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rmem_transport::exchange::Hello;
use rmem_transport::tcp::wire::{Request, Response, REQUEST_LEN, RESPONSE_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.get(..REQUEST_LEN) {
        let b: &[u8; REQUEST_LEN] = b.try_into().expect("length checked");
        if let Ok(r) = Request::decode(b) {
            assert_eq!(&r.encode(), b);
        }
    }
    if let Some(b) = data.get(..RESPONSE_LEN) {
        let b: &[u8; RESPONSE_LEN] = b.try_into().expect("length checked");
        if let Ok(r) = Response::decode(b) {
            assert_eq!(&r.encode(), b);
        }
    }
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(h.encode(), data);
    }
});
