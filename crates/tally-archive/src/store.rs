//! The object store the archive lives in, and the two steps that put a file there: staged
//! (written where no reader looks) and published (moved to where readers look), so that a
//! crash between them never shows readers a file Postgres has not recorded.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, S3CopyIfNotExists};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutPayload};
use sha2::{Digest, Sha256};

use crate::layout::{PUBLISHED, STAGING};
use crate::ArchiveError;

/// The marker object at the store's root: the store's id, as `archive_store` records it.
const IDENTITY: &str = "_tally_archive_id";

/// A file written under `_staging/`, with what Postgres records of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub staging: Path,
    pub published: Path,
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

/// The archive's object store.
#[derive(Debug, Clone)]
pub struct ArchiveStore {
    store: Arc<dyn ObjectStore>,
    /// For a local directory: its path, to make each write durable (fsync) before Postgres
    /// records it. (An object store's put is durable once it answers.)
    local_root: Option<std::path::PathBuf>,
}

impl ArchiveStore {
    /// The store `[archive] url` names:
    /// - `file:///absolute/directory` (created if missing), each write fsynced;
    /// - `s3://bucket/prefix`, with the AWS SDK's environment (`AWS_ACCESS_KEY_ID`,
    ///   `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for an S3-compatible store, ...).
    ///   Publishing copies a file only where none is (a multipart copy completed with
    ///   `If-None-Match: *`, which S3 has done since 2024; `AWS_COPY_IF_NOT_EXISTS` chooses
    ///   another way for stores that lack it);
    /// - `gs://bucket/prefix` (`GOOGLE_SERVICE_ACCOUNT`, ...) and `az://container/prefix`
    ///   (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, ...), which copy only where
    ///   none is by themselves.
    pub fn open(url: &str) -> Result<ArchiveStore, ArchiveError> {
        Self::open_with(url, &[])
    }

    /// [`ArchiveStore::open`] with settings of an object store's own given here rather than
    /// in the environment (`("aws_endpoint", "http://127.0.0.1:9000")`, ...; they win).
    pub fn open_with(url: &str, options: &[(&str, &str)]) -> Result<ArchiveStore, ArchiveError> {
        let refuse = |why: &str| ArchiveError::Url {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let (scheme, _) = url
            .split_once("://")
            .ok_or_else(|| refuse("not a URL: write file:///absolute/path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"))?;
        let unusable = |e: object_store::Error| {
            refuse(&format!(
                "{e}; an object store's settings and credentials come from the environment (AWS_*, GOOGLE_*, AZURE_* variables)"
            ))
        };
        let cloud = |store: Arc<dyn ObjectStore>| -> Result<ArchiveStore, ArchiveError> {
            // Everything goes under the URL's path (the bucket's prefix).
            let prefix = url::Url::parse(url)
                .map_err(|e| refuse(&e.to_string()))?
                .path()
                .trim_matches('/')
                .to_owned();
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                store
            } else {
                Arc::new(PrefixStore::new(store, prefix))
            };
            Ok(ArchiveStore {
                store,
                local_root: None,
            })
        };
        match scheme {
            "file" => {}
            "s3" | "s3a" => {
                let mut builder = AmazonS3Builder::from_env().with_url(url);
                if std::env::var_os("AWS_COPY_IF_NOT_EXISTS").is_none() {
                    builder = builder.with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
                }
                for (key, value) in options {
                    builder = builder.with_config(key.parse().map_err(unusable)?, *value);
                }
                return cloud(Arc::new(builder.build().map_err(unusable)?));
            }
            "gs" => {
                let mut builder = GoogleCloudStorageBuilder::from_env().with_url(url);
                for (key, value) in options {
                    builder = builder.with_config(key.parse().map_err(unusable)?, *value);
                }
                return cloud(Arc::new(builder.build().map_err(unusable)?));
            }
            "az" | "abfs" | "abfss" => {
                let mut builder = MicrosoftAzureBuilder::from_env().with_url(url);
                for (key, value) in options {
                    builder = builder.with_config(key.parse().map_err(unusable)?, *value);
                }
                return cloud(Arc::new(builder.build().map_err(unusable)?));
            }
            _ => {
                return Err(refuse(
                    "unknown scheme: write file:///absolute/path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix",
                ))
            }
        }
        let directory = &url["file://".len()..];
        if !directory.starts_with('/') {
            return Err(refuse(
                "a file:// URL names an absolute directory: file:///var/lib/tally/archive",
            ));
        }
        std::fs::create_dir_all(directory)
            .map_err(|e| refuse(&format!("cannot create the directory: {e}")))?;
        let store = LocalFileSystem::new_with_prefix(directory)?.with_automatic_cleanup(true);
        Ok(ArchiveStore {
            store: Arc::new(store),
            local_root: Some(directory.into()),
        })
    }

    /// A store in memory, for tests.
    pub fn in_memory() -> ArchiveStore {
        ArchiveStore {
            store: Arc::new(InMemory::new()),
            local_root: None,
        }
    }

    /// Writes a file under `staging`, to be published at `published` once recorded.
    pub async fn stage(
        &self,
        staging: Path,
        published: Path,
        file: Vec<u8>,
    ) -> Result<Staged, ArchiveError> {
        let sha256 = hex::encode(Sha256::digest(&file));
        let bytes = file.len() as u64;
        self.store
            .put(&staging, PutPayload::from(Bytes::from(file)))
            .await?;
        self.sync(&staging, true).await?;
        Ok(Staged {
            staging,
            published,
            bytes,
            sha256,
        })
    }

    /// Moves a staged file to its published path. Idempotent: when the staged file is gone, or
    /// the published path is taken, the published file must be the one recorded (its
    /// checksum), and then it is published already.
    ///
    /// A staged file whose size is not the one recorded (cut short by a crash of the disk
    /// under it), or that is neither staged nor published, is [`ArchiveError::Lost`].
    pub async fn publish(&self, staged: &Staged) -> Result<(), ArchiveError> {
        let lost = |why: String| ArchiveError::Lost {
            path: staged.published.to_string(),
            why,
        };
        match self.store.head(&staged.staging).await {
            Ok(meta) if meta.size != staged.bytes => {
                return Err(lost(format!(
                    "the staged file {} is {} bytes, {} were recorded",
                    staged.staging, meta.size, staged.bytes
                )))
            }
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        match self
            .store
            .rename_if_not_exists(&staged.staging, &staged.published)
            .await
        {
            Ok(()) => {
                self.sync(&staged.published, false).await?;
                self.sync(&staged.staging, false).await
            }
            Err(
                object_store::Error::AlreadyExists { .. } | object_store::Error::NotFound { .. },
            ) => {
                let published = match self.store.head(&staged.published).await {
                    // Only a file of the recorded size is read (and hashed) whole.
                    Ok(meta) if meta.size == staged.bytes => {
                        self.store.get(&staged.published).await?.bytes().await?
                    }
                    Ok(_) => {
                        return Err(ArchiveError::File {
                            path: staged.published.to_string(),
                            why: "another file is published at this path (its size differs from the one recorded)".into(),
                        })
                    }
                    Err(object_store::Error::NotFound { .. }) => {
                        // Two publishers at once (S3 may answer both with a conflict), or a
                        // store that briefly did not see it: lost only if it is not staged
                        // either, looked at again now.
                        return match self.store.head(&staged.staging).await {
                            Err(object_store::Error::NotFound { .. }) => {
                                Err(lost("neither staged nor published".into()))
                            }
                            _ => Err(ArchiveError::File {
                                path: staged.published.to_string(),
                                why: "not published yet (another publisher at work?); tried again later".into(),
                            }),
                        };
                    }
                    Err(e) => return Err(e.into()),
                };
                if hex::encode(Sha256::digest(&published)) != staged.sha256 {
                    return Err(ArchiveError::File {
                        path: staged.published.to_string(),
                        why: "another file is published at this path (its checksum differs from the one recorded)".into(),
                    });
                }
                match self.store.delete(&staged.staging).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The id the marker at the store's root carries, if there is one.
    pub async fn identity(&self) -> Result<Option<String>, ArchiveError> {
        match self.store.get(&Path::from(IDENTITY)).await {
            Ok(found) => {
                let bytes = found.bytes().await?;
                Ok(Some(
                    String::from_utf8_lossy(&bytes[..bytes.len().min(64)])
                        .trim()
                        .to_owned(),
                ))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the marker, unless one is there already (then that one stays).
    pub async fn mark_identity(&self, id: &str) -> Result<(), ArchiveError> {
        let put = self
            .store
            .put_opts(
                &Path::from(IDENTITY),
                PutPayload::from(id.to_owned()),
                PutMode::Create.into(),
            )
            .await;
        match put {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.sync(&Path::from(IDENTITY), true).await
    }

    /// Deletes a published file (retention). Deleting one already gone is not an error.
    pub async fn delete(&self, path: &Path) -> Result<(), ArchiveError> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Local directories only: flushes `path` (with `file_too`) and the directories above it
    /// (some were just made) to disk, so that what Postgres records next survives a power loss.
    async fn sync(&self, path: &Path, file_too: bool) -> Result<(), ArchiveError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let file = root.join(path.as_ref());
        let sync = move || -> std::io::Result<()> {
            if file_too {
                std::fs::File::open(&file)?.sync_all()?;
            }
            for directory in file.ancestors().skip(1) {
                match std::fs::File::open(directory) {
                    Ok(opened) => opened.sync_all()?,
                    // The staging directory of a published flush may be gone already.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                if directory == root {
                    break;
                }
            }
            Ok(())
        };
        tokio::task::spawn_blocking(sync)
            .await
            .map_err(|e| ArchiveError::File {
                path: path.to_string(),
                why: format!("fsync did not finish: {e}"),
            })?
            .map_err(|e| ArchiveError::File {
                path: path.to_string(),
                why: format!("fsync: {e}"),
            })
    }

    /// A file's size, without reading it.
    pub async fn size(&self, path: &Path) -> Result<u64, ArchiveError> {
        Ok(self.store.head(path).await?.size)
    }

    pub async fn read(&self, path: &Path) -> Result<Bytes, ArchiveError> {
        Ok(self.store.get(path).await?.bytes().await?)
    }

    /// Every published file (what readers read), in path order.
    pub async fn published(&self) -> Result<Vec<ObjectMeta>, ArchiveError> {
        self.list(PUBLISHED).await
    }

    /// Deletes staged files last changed before `before` that are not in `recorded` (the
    /// staging paths Postgres names): flushes that never committed, whose events a later flush
    /// archived again. A recorded file is never deleted, however old: it waits to be published.
    pub async fn remove_staging_before(
        &self,
        before: DateTime<Utc>,
        recorded: &std::collections::HashSet<Path>,
    ) -> Result<usize, ArchiveError> {
        let mut removed = 0;
        let mut first_error = None;
        for file in self.list(STAGING).await? {
            if file.last_modified < before && !recorded.contains(&file.location) {
                match self.store.delete(&file.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                    // One file that will not go does not keep the others.
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        removed += self.remove_partial_writes(before).await?;
        match first_error {
            Some(e) if removed == 0 => Err(e.into()),
            _ => Ok(removed),
        }
    }

    /// A local directory's writes killed midway (`<name>#<n>`, which listings do not show),
    /// last changed before `before`.
    async fn remove_partial_writes(&self, before: DateTime<Utc>) -> Result<usize, ArchiveError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(0);
        };
        let sweep = move || {
            let mut removed = 0;
            let mut directories = vec![root.join(STAGING)];
            while let Some(directory) = directories.pop() {
                let Ok(entries) = std::fs::read_dir(&directory) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    let Ok(meta) = entry.metadata() else { continue };
                    if meta.is_dir() {
                        directories.push(path);
                        continue;
                    }
                    let old = meta
                        .modified()
                        .map(|at| DateTime::<Utc>::from(at) < before)
                        .unwrap_or(false);
                    let partial = entry.file_name().to_string_lossy().contains('#');
                    if old && partial && std::fs::remove_file(&path).is_ok() {
                        removed += 1;
                    }
                }
            }
            removed
        };
        tokio::task::spawn_blocking(sweep)
            .await
            .map_err(|e| ArchiveError::File {
                path: STAGING.into(),
                why: format!("sweeping partial writes did not finish: {e}"),
            })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ArchiveError> {
        let prefix = Path::from(prefix);
        let mut files = Vec::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(file) = listing.next().await {
            files.push(file?);
        }
        files.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{published_path, staging_path};
    use uuid::Uuid;

    async fn stores() -> (tempfile::TempDir, Vec<ArchiveStore>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/archive", dir.path().display());
        (
            dir,
            vec![ArchiveStore::open(&url).unwrap(), ArchiveStore::in_memory()],
        )
    }

    #[tokio::test]
    async fn a_staged_file_is_seen_by_readers_only_once_published_and_publishing_again_is_harmless()
    {
        let (_dir, stores) = stores().await;
        for store in stores {
            let flush = Uuid::now_v7();
            let hour = "2026-12-07T11:00:00Z".parse().unwrap();
            let staged = store
                .stage(
                    staging_path(flush, 0),
                    published_path(hour, flush, 0),
                    b"file".to_vec(),
                )
                .await
                .unwrap();
            assert!(store.published().await.unwrap().is_empty(), "{store:?}");
            store.publish(&staged).await.unwrap();
            // A crash after the move, before Postgres heard of it: published again.
            store.publish(&staged).await.unwrap();
            let published = store.published().await.unwrap();
            assert_eq!(published.len(), 1);
            assert_eq!(published[0].location, staged.published);
            assert_eq!(store.read(&staged.published).await.unwrap(), &b"file"[..]);

            // Another file where one is published: refused, not overwritten.
            let other = store
                .stage(
                    staging_path(flush, 1),
                    staged.published.clone(),
                    b"other".to_vec(),
                )
                .await
                .unwrap();
            let error = store.publish(&other).await.unwrap_err();
            assert!(error.to_string().contains("another file"), "{error}");
            assert_eq!(store.read(&staged.published).await.unwrap(), &b"file"[..]);

            // Staging left by flushes that never committed is cleaned up.
            let removed = store
                .remove_staging_before(
                    Utc::now() + chrono::TimeDelta::minutes(1),
                    &Default::default(),
                )
                .await
                .unwrap();
            assert_eq!(removed, 1);
            assert_eq!(store.published().await.unwrap().len(), 1);
        }
    }

    #[test]
    fn urls_name_a_local_directory_or_an_object_store() {
        for (url, says) in [
            ("file://relative/dir", "absolute directory"),
            ("ftp://host/archive", "unknown scheme"),
            ("/var/lib/tally/archive", "not a URL"),
        ] {
            let error = ArchiveStore::open(url).unwrap_err();
            assert!(error.to_string().contains(says), "{url}: {error}");
        }
        // Object stores open without a request; what they lack is named.
        ArchiveStore::open("s3://bucket/archive").unwrap();
        let error = ArchiveStore::open_with("az://container/archive", &[]).unwrap_err();
        assert!(error.to_string().contains("AZURE_"), "{error}");
    }
}
