//! A TCP proxy a test can cut and restore, to take Postgres or RabbitMQ away
//! from the code under test without touching the shared servers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
    /// Connections refused while cut: proof the client tried during the outage.
    refused: Arc<std::sync::atomic::AtomicUsize>,
}

struct State {
    up: bool,
    /// Cancelled to drop every connection of the current generation.
    generation: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            up: true,
            generation: CancellationToken::new(),
        }));
        let stop = CancellationToken::new();
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (accept_state, accept_stop, accept_refused) =
            (state.clone(), stop.clone(), refused.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let (up, generation) = {
                    let s = accept_state.lock().unwrap();
                    (s.up, s.generation.clone())
                };
                if !up {
                    accept_refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = generation.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Self {
            addr,
            state,
            stop,
            refused,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        let mut s = self.state.lock().unwrap();
        s.up = false;
        s.generation.cancel();
        s.generation = CancellationToken::new();
    }

    /// Connections refused since the proxy started.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn restore(&self) {
        self.state.lock().unwrap().up = true;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

/// `postgres://u@host:port/db` or `amqp://u:p@host:port/vhost` with host and
/// port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}/{path}")
}

/// The `host:port` of a URL, resolved.
pub fn target_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let host_port = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    use std::net::ToSocketAddrs;
    host_port.to_socket_addrs().unwrap().next().unwrap()
}
