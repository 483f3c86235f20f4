//! The repositories the coordinator serves over git's smart HTTP protocol and the files store's
//! index (the bytes live on disk under their digest).

use serde::Serialize;

use super::db::p;
use super::time::{self, from_ms};
use super::{Result, Store};
use chrono::{DateTime, Utc};

/// A repository the coordinator serves over git's smart HTTP protocol.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RepoRow {
    pub name: String,
    pub path: String,
    #[serde(serialize_with = "time::serialize")]
    pub added_at: DateTime<Utc>,
}

/// A file in the coordinator's files store.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileRow {
    pub bucket: String,
    pub key: String,
    pub sha256: String,
    pub size: i64,
    #[serde(serialize_with = "time::serialize")]
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Registers (or re-points) a repository.
    pub fn add_repo(&mut self, name: &str, path: &str, now: i64) -> Result<()> {
        self.tx(|t| {
            t.exec(
                "INSERT INTO repos (name, path, added_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET path = excluded.path, added_at = excluded.added_at",
                p![name, path, now],
            )?;
            Ok(())
        })
    }

    /// Removes a repository; false when it was not registered.
    pub fn remove_repo(&mut self, name: &str) -> Result<bool> {
        self.tx(|t| Ok(t.exec("DELETE FROM repos WHERE name = ?1", p![name])? > 0))
    }

    pub fn repo_path(&mut self, name: &str) -> Result<Option<String>> {
        self.read(|t| t.opt("SELECT path FROM repos WHERE name = ?1", p![name], |r| r.get(0)))
    }

    pub fn repos(&mut self) -> Result<Vec<RepoRow>> {
        self.read(|t| {
            t.all("SELECT name, path, added_at FROM repos ORDER BY name", p![], |r| {
                Ok(RepoRow { name: r.get(0)?, path: r.get(1)?, added_at: from_ms(r.get(2)?) })
            })
        })
    }

    /// Records a stored file (its bytes are already in place under its digest).
    pub fn put_file(&mut self, bucket: &str, key: &str, sha256: &str, size: i64, now: i64) -> Result<()> {
        self.tx(|t| {
            t.exec(
                "INSERT INTO files (bucket, key, sha256, size, created_at) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (bucket, key) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size, \
                 created_at = excluded.created_at",
                p![bucket, key, sha256, size, now],
            )?;
            Ok(())
        })
    }

    /// `(sha256, size)` of a stored file.
    pub fn file(&mut self, bucket: &str, key: &str) -> Result<Option<(String, i64)>> {
        self.read(|t| {
            t.opt("SELECT sha256, size FROM files WHERE bucket = ?1 AND key = ?2", p![bucket, key], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        })
    }

    pub fn files(&mut self) -> Result<Vec<FileRow>> {
        self.read(|t| {
            t.all("SELECT bucket, key, sha256, size, created_at FROM files ORDER BY bucket, key", p![], |r| {
                Ok(FileRow {
                    bucket: r.get(0)?,
                    key: r.get(1)?,
                    sha256: r.get(2)?,
                    size: r.get(3)?,
                    created_at: from_ms(r.get(4)?),
                })
            })
        })
    }
}
