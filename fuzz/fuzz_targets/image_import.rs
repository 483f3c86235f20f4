//! `image::import` of a docker-save or OCI layout tarball (plain or gzip) from a temporary file,
//! into a store of its own: any bytes import or fail without a panic, and nothing is written
//! outside the store.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tmp) = tempfile::tempdir() else { return };
    let file = tmp.path().join("image.tar");
    let store_dir = tmp.path().join("store");
    if std::fs::write(&file, data).is_err() {
        return;
    }
    let Ok(store) = executor::image::ImageStore::open(&store_dir) else { return };
    let _ = executor::image::import::import(&store, "fuzz", &file);
    let mut names: Vec<_> = std::fs::read_dir(tmp.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    names.sort();
    assert_eq!(names, ["image.tar", "store"], "the import wrote outside its store");
});
