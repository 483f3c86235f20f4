//! What a layer blob is: how its media type says it is compressed, and the blob as the plain
//! tar stream it holds, decompressed exactly once (a cap or a hash around the result counts what
//! the tar reader reads).

use std::fs;
use std::io::{BufRead, BufReader, Read};

use anyhow::{Context, Result};

/// How a layer of `media_type` is compressed; `None` for a type that is no layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    Plain,
    Gzip,
    Zstd,
    /// No media type (old manifests): told by the magic bytes, once.
    Sniff,
}

pub(crate) fn compression(media_type: &str) -> Option<Compression> {
    let t = media_type.trim();
    if t.is_empty() {
        Some(Compression::Sniff)
    } else if t.ends_with("+gzip") || t.ends_with(".tar.gzip") || t.ends_with("tar.gz") {
        Some(Compression::Gzip)
    } else if t.ends_with("+zstd") || t.ends_with(".tar.zstd") {
        Some(Compression::Zstd)
    } else if t.ends_with(".tar") || t.ends_with("layer.v1.tar") || t.ends_with("rootfs.diff.tar") {
        Some(Compression::Plain)
    } else {
        None
    }
}

/// A layer blob as a plain tar stream, decompressed exactly once as `media_type` says: what
/// comes out is what the tar reader reads and the cap counts.
pub(crate) fn decompress(f: fs::File, media_type: &str) -> Result<Box<dyn Read>> {
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let kind = match compression(media_type).context("an unsupported layer media type")? {
        Compression::Sniff => {
            let head = r.fill_buf()?;
            if head.starts_with(&[0x1f, 0x8b]) {
                Compression::Gzip
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Compression::Zstd
            } else {
                Compression::Plain
            }
        }
        k => k,
    };
    Ok(match kind {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r).context("starting zstd")?),
        Compression::Plain | Compression::Sniff => Box::new(r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_decompress_once_by_media_type() {
        assert_eq!(compression("application/vnd.oci.image.layer.v1.tar+gzip"), Some(Compression::Gzip));
        assert_eq!(compression("application/vnd.docker.image.rootfs.diff.tar.gzip"), Some(Compression::Gzip));
        assert_eq!(compression("application/vnd.oci.image.layer.v1.tar+zstd"), Some(Compression::Zstd));
        assert_eq!(compression("application/vnd.oci.image.layer.v1.tar"), Some(Compression::Plain));
        assert_eq!(compression(""), Some(Compression::Sniff));
        assert_eq!(compression("application/vnd.oci.image.config.v1+json"), None);

        // A gzip layer that holds another gzip stream yields that stream, not its content.
        use std::io::Write;
        let tar = vec![b'x'; 4096];
        let gz = |b: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(b).unwrap();
            e.finish().unwrap()
        };
        let inner = gz(&tar);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer");
        std::fs::write(&path, gz(&inner)).unwrap();
        let mut out = Vec::new();
        decompress(fs::File::open(&path).unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, inner);
    }
}
