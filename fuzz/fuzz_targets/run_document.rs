//! A run document (`document::parse`), which the stages read from a file a previous stage (or a
//! user) wrote: any bytes parse or fail without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = executor::document::parse(data);
});
