//! A TCP proxy a test can cut: while cut, connections stay open but no byte
//! passes either way and new connections hang — what a network partition
//! looks like to both ends (no RST, no FIN), unlike killing a process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Partition {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    changed: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    /// Listens on `listen` and forwards every connection to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Partition> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let (changed, _) = watch::channel(false);
        let (c, tx) = (cut.clone(), changed.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (cut, rx) = (c.clone(), tx.subscribe());
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        relay(inbound, outbound, cut, rx).await;
                    }
                });
            }
        });
        Ok(Partition { addr, cut, changed, task })
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.changed.send(true);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        let _ = self.changed.send(false);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(inbound: TcpStream, outbound: TcpStream, cut: Arc<AtomicBool>, rx: watch::Receiver<bool>) {
    let (mut ir, mut iw) = inbound.into_split();
    let (mut or, mut ow) = outbound.into_split();
    let up = pump(&mut ir, &mut ow, cut.clone(), rx.clone());
    let down = pump(&mut or, &mut iw, cut, rx);
    tokio::join!(up, down);
}

/// Copies bytes while not cut; while cut, holds what it read until healed.
async fn pump(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    cut: Arc<AtomicBool>,
    mut rx: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while cut.load(Ordering::SeqCst) {
            if rx.changed().await.is_err() {
                return;
            }
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while cut.load(Ordering::SeqCst) {
            if rx.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
