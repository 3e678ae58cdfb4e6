//! A TCP relay whose connections can be blackholed: a network path to a server that silently dies.
//!
//! [`Blackhole`] forwards every connection to an upstream address byte for byte. [`Blackhole::freeze`]
//! makes every connection open at that moment stop forwarding in both directions without closing
//! (no FIN, no RST: what a client sees when a NAT entry or a route disappears), while connections made
//! afterwards are forwarded again. A client that notices only by its own timers must reconnect.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A relay to one upstream whose live connections can be frozen.
pub struct Blackhole {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    freeze: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Blackhole {
    /// Listen on 127.0.0.1 on a free port and relay every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Blackhole> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let (freeze, _) = watch::channel(0);
        let count = accepted.clone();
        let freezes = freeze.clone();
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut frozen = freezes.subscribe();
                relays.spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        _ = frozen.changed() => {}
                    }
                    // Frozen: hold both sockets open and move nothing, until the relay is dropped.
                    let _held = (client, server);
                    std::future::pending::<()>().await;
                });
            }
        });
        Ok(Blackhole {
            addr,
            accepted,
            freeze,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections relayed so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stop forwarding on every connection open now, without closing any; later ones are relayed.
    pub fn freeze(&self) {
        self.freeze.send_modify(|g| *g += 1);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
