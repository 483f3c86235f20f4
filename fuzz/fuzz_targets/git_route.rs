//! The coordinator's git smart-HTTP request paths (`githttp::GitRoute::split`, what
//! `/.executors/git/<name>/<route>` is cut into): never panics, and the repository name it gives
//! is the path without its leading slashes and the route suffix.
#![no_main]

use executor::githttp::GitRoute;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if let Some((name, route)) = GitRoute::split(path) {
        let suffix = match route {
            GitRoute::InfoRefs => "/info/refs",
            GitRoute::UploadPack => "/git-upload-pack",
        };
        assert_eq!(format!("{name}{suffix}"), path.trim_start_matches('/'));
    }
});
