//! Test fixture: opens a TCP connection (to the address in its config, default the
//! loopback discard port `127.0.0.1:9`) and sends the batch size. Beacon must refuse this
//! component at load (it imports `wasi:sockets`), so it never actually connects.

use std::io::Write;
use std::net::TcpStream;

use beacon_plugin_sdk::{Event, PluginError};

pub fn process(config: &str, batch: Vec<Event>) -> Result<Vec<Event>, PluginError> {
    let addr = match config.trim() {
        "" => "127.0.0.1:9",
        a => a,
    };
    let mut stream =
        TcpStream::connect(addr).map_err(|e| PluginError::new(format!("connect {addr}: {e}")))?;
    writeln!(stream, "{}", batch.len()).map_err(|e| PluginError::new(format!("send: {e}")))?;
    Ok(batch)
}

beacon_plugin_sdk::export_plugin!(process);
