//! `role=ping` / `role=pong`: notifications back and forth over the port
//! the hypervisor bound for a manifest channel.

use abi::ev::Pingpong;
use libdom::{event, evtchn_send, println, Error, EventLoop, StartInfo};

/// The channel the scenarios use unless `channel=` says otherwise.
pub const CHANNEL: &str = "pp";

/// Blocks until `port` is pending (other ports are reported and dropped).
fn wait_for(lp: &mut EventLoop, port: u16, role: &str) -> Result<(), Error> {
    loop {
        let q = lp.next_port()?;
        if q == port {
            return Ok(());
        }
        println!("{role}: notification on unexpected port {q}");
    }
}

/// Ping sends and then waits for the reply, `count` times; pong waits and
/// then replies. Strictly alternating, so no notification can merge with
/// another in the pending bitmap. Each reports `pingpong {role, sent,
/// received}` and returns 0 if both counts are `count`.
pub fn run(si: &StartInfo<'_>, ping: bool, count: u64, channel: &str) -> i64 {
    let role = if ping { "ping" } else { "pong" };
    let Some(p) = si.port(channel) else {
        println!("{role}: my start info has no port for channel \"{channel}\"");
        return 1;
    };
    let port = p.port;
    let mut lp = EventLoop::new();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut exchange = || -> Result<(), (&str, Error)> {
        for _ in 0..count {
            if ping {
                evtchn_send(port).map_err(|e| ("send", e))?;
                sent += 1;
            }
            wait_for(&mut lp, port, role).map_err(|e| ("wait", e))?;
            received += 1;
            if !ping {
                evtchn_send(port).map_err(|e| ("send", e))?;
                sent += 1;
            }
        }
        Ok(())
    };
    if let Err((what, e)) = exchange() {
        println!("{role}: {what} on port {port} failed: {}", e.name());
    }
    let _ = event(&Pingpong {
        role,
        sent,
        received,
    });
    if sent == count && received == count {
        0
    } else {
        1
    }
}
