//! The agent protocol's decoder: the input is a byte stream of frames, read
//! the way both sides read their peer. Every frame must decode or fail
//! cleanly, and whatever decodes must re-encode to a frame that decodes to
//! the same message.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use supermachine_agent_protocol::{
    AgentMessage, Handshake, HostMessage, decode, encode_frame, read_frame, read_payload,
};

fn round_trip<T>(payload: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(message) = decode::<T>(payload) {
        let frame = encode_frame(&message).expect("a decoded message re-encodes");
        let back: T = read_frame(&mut Cursor::new(frame))
            .expect("a re-encoded frame decodes")
            .expect("one frame");
        assert_eq!(back, message);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut stream = Cursor::new(data);
    let _ = read_frame::<_, Handshake>(&mut stream).map(|h| h.map(|h| h.check()));
    while let Ok(Some(payload)) = read_payload(&mut stream) {
        round_trip::<HostMessage>(&payload);
        round_trip::<AgentMessage>(&payload);
    }
});
