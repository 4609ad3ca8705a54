//! The connecting side: a session (with credentials, so challenges are
//! answered) fed whatever a node, or an impostor, might send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_net::auth::Credentials;
use ringkv_net::proto::{Hello, Request, Role};
use ringkv_net::session::Session;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else { return };
    let hello = match mode % 2 {
        0 => Hello::client("ringkv"),
        _ => Hello { role: Role::Peer, node_id: "n1".into(), ..Hello::client("ringkv") },
    };
    let creds = match mode % 2 {
        0 => Credentials::Token("client-token-0123456789".into()),
        _ => Credentials::ClusterSecret("cluster-secret-0123456789".into()),
    };
    let mut s = Session::with_credentials(hello, Some(creds));
    s.send(Request::Ping { payload: vec![1] }, 0);
    for chunk in stream.chunks(usize::from(mode / 2 % 32) + 1) {
        s.receive(chunk);
        loop {
            match s.poll() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        let n = s.output().len();
        s.consumed(n);
    }
});
