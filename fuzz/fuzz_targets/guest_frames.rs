//! The guest agent's frames as the host decodes them (`guest::protocol::Decoder`): the input is
//! fed in pieces whose sizes come from its first byte; decoding never panics, never holds more
//! than one frame's worth of bytes, and every frame's body parses or fails cleanly.
#![no_main]

use executor::guest::protocol::{Decoder, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let mut dec = Decoder::new();
    for piece in rest.chunks(step) {
        let piece = &piece[..piece.len().min(dec.room())];
        dec.feed(piece);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.body.len() < MAX_FRAME);
                    let _ = frame.split_data();
                    let _ = frame.parse::<serde_json::Value>();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(dec.room() <= 4 + MAX_FRAME);
    }
});
