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

/// A TCP proxy that holds every byte coming back from `target` for a delay
/// that can be changed while it runs: a server that answers that much
/// slower, without limiting how much it answers (bytes are held by deadline,
/// not one chunk at a time).
pub struct SlowReplies {
    pub addr: SocketAddr,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowReplies {
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<SlowReplies> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let delay = delay.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (mut ir, mut iw) = inbound.into_split();
                        let (mut or, mut ow) = outbound.into_split();
                        let up = tokio::io::copy(&mut ir, &mut ow);
                        let down = delayed_copy(&mut or, &mut iw, delay);
                        let _ = tokio::join!(up, down);
                    }
                });
            }
        });
        Ok(SlowReplies { addr, delay_ms, task })
    }

    /// From now on, replies arrive this much later.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for SlowReplies {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn delayed_copy(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due =
                        tokio::time::Instant::now() + std::time::Duration::from_millis(delay_ms.load(Ordering::SeqCst));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
}
