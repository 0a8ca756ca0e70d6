//! A TCP echo server for the agent's connect test: listens on the port
//! given (0.0.0.0 and ::), prints `TCP-ECHO-READY`, and echoes every
//! connection back until its end.

use std::io::Write;
use std::net::TcpListener;

fn serve(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let Ok(mut reader) = conn.try_clone() else {
                return;
            };
            let mut writer = conn;
            let _ = std::io::copy(&mut reader, &mut writer);
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
    }
}

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(7070);
    let v4 = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tcp-echo: listening on port {port}: {e}");
            std::process::exit(1);
        }
    };
    if let Ok(v6) = TcpListener::bind(("::", port)) {
        std::thread::spawn(move || serve(v6));
    }
    println!("TCP-ECHO-READY");
    let _ = std::io::stdout().flush();
    serve(v4);
}
