//! A job as the coordinator sends it (`protocol::Job`, payload v1 or v2): any bytes parse or fail
//! without a panic, and a job that parses gives its uid and splits it back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(job) = serde_json::from_slice::<executor::protocol::Job>(data) {
        let uid = job.uid();
        let _ = executor::protocol::split_uid(&uid);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = executor::protocol::split_uid(text);
        let _ = executor::protocol::wants_v2_payload(text);
    }
});
