//! Fuzzes the donor's control-message decoder: no input may panic, and whatever decodes must
//! survive a round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rmem_wire::protocol::{decode, ClientMsg, ServerMsg};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode::<ClientMsg>(data) {
        let again = serde_json::to_vec(&m).expect("a decoded message encodes");
        assert_eq!(decode::<ClientMsg>(&again).ok(), Some(m));
    }
    if let Ok(m) = decode::<ServerMsg>(data) {
        let again = serde_json::to_vec(&m).expect("a decoded message encodes");
        assert_eq!(decode::<ServerMsg>(&again).ok(), Some(m));
    }
});
