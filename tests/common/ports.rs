//! Ports for the servers a test starts itself. Outside the kernel's
//! ephemeral range (32768-60999 here), which outgoing connections also draw
//! from: a port found free by binding port 0 can be taken by any client
//! socket before the server binds it. Shared by the test binaries and the
//! benchmark (which includes the SMTP fixture).

/// A port of 127.0.0.1 for a server of the test's own, free to bind now:
/// drawn from 20000..32000, below the kernel's ephemeral range (32768 and
/// up), which binding port 0 and every outgoing connection draw from, so
/// nothing else takes it between this check and the server's start
/// (another test's draw aside, which the random pick makes unlikely).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(20000..32000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000 after 1000 tries");
}
