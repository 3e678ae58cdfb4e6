//! The background thread that fills the publish index from sled after every open, and rewrites records of
//! an older format (sealing clear tokens once a store key is configured) as it goes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::index::PublishIndex;
use super::lock;
use crate::store::record::{Codec, PublishFields};

/// Registrations the rebuild reads before taking the index's lock once to add them.
const REBUILD_BATCH: usize = 1024;

/// The thread that fills the index from sled after an open.
pub(super) struct Rebuild {
    /// Asks the thread to stop early (the store is being closed).
    stop: Arc<AtomicBool>,
    /// Joined on drop, so the database is closed once the store is.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rebuild {
    /// Start rebuilding on a thread of its own.
    pub fn start(rebuilder: Rebuilder) -> std::io::Result<Rebuild> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("knock-index".into())
            .spawn(move || rebuilder.run(&flag))?;
        Ok(Rebuild {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Rebuild {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the index rebuild thread needs of the store.
pub(super) struct Rebuilder {
    pub db: sled::Db,
    pub registrations: sled::Tree,
    pub codec: Codec,
    pub index: Arc<PublishIndex>,
    /// The store's write lock, held while rewriting records.
    pub writes: Arc<Mutex<()>>,
}

impl Rebuilder {
    /// Fill the index from every stored registration, a batch per lock, and rewrite records of an older
    /// format in the current one (sealing clear tokens once a store key is configured). Stops early when
    /// asked. A record it cannot read leaves the index incomplete, so misses keep falling through to sled,
    /// which reports the damage to whoever asks for that node.
    fn run(self, stop: &AtomicBool) {
        let started = std::time::Instant::now();
        let mut batch: Vec<(sled::IVec, sled::IVec)> = Vec::with_capacity(REBUILD_BATCH);
        let (mut damaged, mut rewritten) = (0usize, 0usize);
        let mut iter = self.registrations.iter();
        loop {
            batch.clear();
            for item in iter.by_ref().take(REBUILD_BATCH) {
                match item {
                    Ok(kv) => batch.push(kv),
                    Err(e) => {
                        tracing::error!(error = %e, "reading the store to build the publish index failed; publishes will read the store");
                        return;
                    }
                }
            }
            if batch.is_empty() || stop.load(Ordering::Relaxed) {
                break;
            }
            let mut current: Vec<(&str, PublishFields<'_>)> = Vec::with_capacity(batch.len());
            let mut stale = Vec::new();
            for (key, value) in &batch {
                let Ok(node) = std::str::from_utf8(key) else {
                    damaged += 1;
                    continue;
                };
                if !self.codec.is_current(value) {
                    stale.push((key, value));
                }
                match self.codec.publish_fields(key, value) {
                    Ok(Some(fields)) => current.push((node, fields)),
                    // A JSON record of an early version: decode it whole.
                    Ok(None) => match self.codec.decode(key, value) {
                        Ok(r) => self.index.rebuild_batch([(node, PublishFields::of(&r))]),
                        Err(_) => damaged += 1,
                    },
                    Err(_) => damaged += 1,
                }
            }
            self.index.rebuild_batch(current);
            rewritten += self.rewrite(&stale);
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if rewritten > 0 {
            match self.db.flush() {
                Ok(_) => tracing::info!(rewritten, "records of an older format rewritten"),
                Err(e) => {
                    tracing::error!(error = %e, "flushing rewritten records failed; they are rewritten again at the next start")
                }
            }
        }
        if damaged > 0 {
            tracing::error!(damaged, "records in the store cannot be read; publishes to unknown nodes will read the store");
            return;
        }
        self.index.finish_rebuild();
        release_freed_memory();
        tracing::info!(
            registrations = self.index.len(),
            ms = started.elapsed().as_millis() as u64,
            "publish index ready"
        );
    }

    /// Rewrite records in the current format, each only if it is still what the rebuild read (a write since
    /// then wrote the current format already). Returns how many were rewritten.
    fn rewrite(&self, stale: &[(&sled::IVec, &sled::IVec)]) -> usize {
        let _writes = lock(&self.writes);
        let mut rewritten = 0;
        for (key, old) in stale {
            let Ok(registration) = self.codec.decode(key, old) else {
                continue;
            };
            let Ok(new) = self.codec.encode(&registration) else {
                continue;
            };
            match self
                .registrations
                .compare_and_swap(key, Some(old.as_ref()), Some(new))
            {
                Ok(Ok(())) => rewritten += 1,
                Ok(Err(_)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "rewriting a record in the current format failed; it stays readable as it is");
                    return rewritten;
                }
            }
        }
        rewritten
    }
}

/// Give the heap pages the rebuild freed back to the OS. Reading a million records through sled allocates
/// and frees hundreds of MiB on this thread's own malloc arena, which glibc keeps otherwise: the process
/// would hold it for good as resident memory it does not use.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the OS; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
