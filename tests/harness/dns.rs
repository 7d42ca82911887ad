//! A small authoritative DNS server for tests: answers A/AAAA for the names
//! it is given, NXDOMAIN otherwise, and records every question it gets.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{rdata, Name, RData, Record, RecordType},
};

pub struct TestDns {
    pub addr: SocketAddr,
    questions: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl TestDns {
    pub fn start(socket: UdpSocket, zone: HashMap<String, Vec<IpAddr>>) -> Self {
        let addr = socket.local_addr().unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let questions = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (questions, stop) = (questions.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = socket.recv_from(&mut buf) else { continue };
                    if let Some(reply) = answer(&buf[..n], &zone, &questions) {
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            });
        }
        Self { addr, questions, stop }
    }

    /// Names asked so far (lowercase, no trailing dot).
    pub fn questions(&self) -> Vec<String> {
        self.questions.lock().unwrap().clone()
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn answer(query: &[u8], zone: &HashMap<String, Vec<IpAddr>>, questions: &Mutex<Vec<String>>) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries().first()?.clone();
    let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    questions.lock().unwrap().push(name.clone());
    let mut reply = Message::new();
    reply.set_id(request.id()).set_message_type(MessageType::Response).set_recursion_desired(true);
    reply.set_recursion_available(true).set_authoritative(true);
    reply.add_query(question.clone());
    match zone.get(&name) {
        None => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
        Some(ips) => {
            let owner = Name::from_ascii(format!("{name}.")).ok()?;
            for ip in ips {
                let data = match (ip, question.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(*v6)),
                    _ => continue,
                };
                reply.add_answer(Record::from_rdata(owner.clone(), 60, data));
            }
        }
    }
    reply.to_vec().ok()
}
