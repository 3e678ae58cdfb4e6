//! A TCP peer that accepts connections and never says a word: an APNs (or any server) that hangs.
//!
//! It accepts, holds each connection open without reading from or writing to it, and counts the
//! connections, so a test can check that a client gives up in time and how often it tries again.
//! Dropping it closes the listener and every connection it holds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A listener that accepts and stays silent.
pub struct SilentPeer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl SilentPeer {
    /// Listen on `addr` (e.g. the port of a mock that [went down](crate::apns::MockApns::go_down)).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<SilentPeer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            // Held, never read: the peer's bytes sit in the socket buffer and nothing comes back.
            let mut held: Vec<TcpStream> = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(tcp);
            }
        });
        Ok(SilentPeer {
            addr,
            accepted,
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Close the listener and every held connection, and wait until the port is free.
    pub async fn close(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for SilentPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
