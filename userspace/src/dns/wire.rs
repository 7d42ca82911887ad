//! DNS wire helpers: reading just enough of a message, writing the replies
//! the resolver makes up itself, matching upstream replies to queries,
//! pulling addresses out of answers, and TCP framing.

use std::{net::IpAddr, time::Duration};

use hickory_proto::{
    op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData},
    serialize::binary::{BinDecodable, BinDecoder},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of a DNS header.
pub(crate) const HEADER_LEN: usize = 12;

/// What a reply needs from the request it answers.
#[derive(Clone, Debug)]
pub(crate) struct RequestView {
    pub(crate) id: u16,
    pub(crate) op_code: OpCode,
    pub(crate) recursion_desired: bool,
    /// Echoed back: stub resolvers such as glibc drop replies whose question
    /// does not match theirs and keep waiting until they time out.
    pub(crate) question: Option<Query>,
    /// An EDNS query gets an OPT record back (RFC 6891).
    pub(crate) edns: bool,
}

impl RequestView {
    pub(crate) fn from_header(header: &Header) -> Self {
        Self {
            id: header.id(),
            op_code: header.op_code(),
            recursion_desired: header.recursion_desired(),
            question: None,
            edns: false,
        }
    }

    /// For messages too short for a header: only the id is known.
    pub(crate) fn id_only(id: u16) -> Self {
        Self { id, op_code: OpCode::Query, recursion_desired: false, question: None, edns: false }
    }

    pub(crate) fn from_message(message: &Message) -> Self {
        Self {
            question: message.queries().first().cloned(),
            edns: message.extensions().is_some(),
            ..Self::from_header(message.header())
        }
    }
}

/// The UDP payload size the resolver advertises in its own OPT records.
const ADVERTISED_PAYLOAD: u16 = 1232;

/// A reply with no records: refusals, errors, and the truncated stand-in
/// for answers too big for a UDP client.
pub(crate) fn synthesize(
    request: &RequestView,
    rcode: ResponseCode,
    truncated: bool,
) -> Result<Vec<u8>, hickory_proto::ProtoError> {
    let mut reply = Message::new();
    reply
        .set_id(request.id)
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code)
        .set_recursion_desired(request.recursion_desired)
        .set_recursion_available(true)
        .set_truncated(truncated)
        .set_response_code(rcode);
    if let Some(question) = &request.question {
        reply.add_query(question.clone());
    }
    if request.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(ADVERTISED_PAYLOAD).set_version(0);
        reply.set_edns(edns);
    }
    reply.to_vec()
}

/// Reads the header alone.
pub(crate) fn read_header(bytes: &[u8]) -> Option<Header> {
    Header::read(&mut BinDecoder::new(bytes)).ok()
}

/// Whether the record counts can possibly fit in `len` bytes. Checked
/// before a full parse because the parser reserves memory by the counts,
/// and a 12-byte packet can claim 65535 of each.
pub(crate) fn counts_fit(header: &Header, len: usize) -> bool {
    // Smallest question: root name (1) + type (2) + class (2).
    // Smallest record: root name (1) + type, class, ttl, rdlength (10).
    let questions = usize::from(header.query_count()) * 5;
    let records = (usize::from(header.answer_count())
        + usize::from(header.name_server_count())
        + usize::from(header.additional_count()))
        * 11;
    HEADER_LEN + questions + records <= len
}

/// Parses a whole message and insists nothing follows it: bytes after the
/// message would ride along to upstream unseen.
pub(crate) fn parse_exact(bytes: &[u8]) -> Result<Message, &'static str> {
    let mut decoder = BinDecoder::new(bytes);
    let message = Message::read(&mut decoder).map_err(|_| "does not parse as DNS")?;
    if decoder.is_empty() {
        Ok(message)
    } else {
        Err("trailing bytes after the message")
    }
}

/// What a reply to a forwarded query must carry.
#[derive(Clone, Debug)]
pub(crate) struct ExpectedReply {
    id: u16,
    questions: Vec<Query>,
}

impl ExpectedReply {
    pub(crate) fn from_query(query: &[u8]) -> Result<Self, hickory_proto::ProtoError> {
        let mut decoder = BinDecoder::new(query);
        let header = Header::read(&mut decoder)?;
        let questions = Message::read_queries(&mut decoder, usize::from(header.query_count()))?;
        Ok(Self { id: header.id(), questions })
    }

    pub(crate) fn id(&self) -> u16 {
        self.id
    }

    /// Same id and question (names compared case-insensitively, since
    /// resolvers may answer with 0x20-mixed case). A reply without a
    /// question is accepted only as an error: servers answer `FORMERR` or
    /// `SERVFAIL` that way when they could not read the question.
    pub(crate) fn matches(&self, reply: &[u8]) -> bool {
        let mut decoder = BinDecoder::new(reply);
        let Ok(header) = Header::read(&mut decoder) else {
            return false;
        };
        if header.message_type() != MessageType::Response || header.id() != self.id {
            return false;
        }
        if header.query_count() == 0 {
            return header.response_code() != ResponseCode::NoError;
        }
        match Message::read_queries(&mut decoder, usize::from(header.query_count())) {
            Ok(questions) => questions == self.questions,
            Err(_) => false,
        }
    }
}

/// The A/AAAA addresses an answer section gives for `qname`, following
/// CNAME chains from it. Each TTL is the smallest along the chain, since the
/// mapping from the queried name holds no longer than its weakest link.
/// Records for names the chain does not reach are ignored: the name they
/// would be attributed to is not the one the sandbox asked for.
pub(crate) fn answer_addresses(reply: &Message, qname: &Name) -> Vec<(IpAddr, Duration)> {
    // (name reached, smallest TTL on the way there)
    let mut reached: Vec<(&Name, u32)> = vec![(qname, u32::MAX)];
    // Each pass can only add names; a chain longer than the answer section
    // is a loop, so bound the passes by its length.
    for _ in 0..reply.answers().len() {
        let mut grew = false;
        for record in reply.answers() {
            let RData::CNAME(target) = record.data() else {
                continue;
            };
            let Some(owner_ttl) = reached.iter().find(|(n, _)| *n == record.name()).map(|(_, ttl)| *ttl) else {
                continue;
            };
            let ttl = owner_ttl.min(record.ttl());
            match reached.iter_mut().find(|(n, _)| *n == &target.0) {
                Some(entry) if entry.1 >= ttl => {}
                Some(entry) => {
                    entry.1 = ttl;
                    grew = true;
                }
                None => {
                    reached.push((&target.0, ttl));
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }

    let mut addresses: Vec<(IpAddr, Duration)> = Vec::new();
    for record in reply.answers() {
        let ip = match record.data() {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        let Some((_, chain_ttl)) = reached.iter().find(|(n, _)| *n == record.name()) else {
            continue;
        };
        let ttl = Duration::from_secs(u64::from(record.ttl().min(*chain_ttl)));
        match addresses.iter_mut().find(|(known, _)| *known == ip) {
            Some(entry) => entry.1 = entry.1.max(ttl),
            None => addresses.push((ip, ttl)),
        }
    }
    addresses
}

/// Why a framed read ended without a message.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The peer closed or the connection broke.
    Closed,
    /// The peer announced a message longer than allowed (or empty).
    BadLength(usize),
}

/// Reads one RFC 1035 §4.2.2 length-prefixed message of at most `max` bytes.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0_u8; 2];
    reader.read_exact(&mut len).await.map_err(|_| FrameError::Closed)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 || len > max {
        return Err(FrameError::BadLength(len));
    }
    let mut message = vec![0_u8; len];
    reader.read_exact(&mut message).await.map_err(|_| FrameError::Closed)?;
    Ok(message)
}

/// Writes one length-prefixed message, in a single write so the length and
/// the message do not go out as separate segments.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "DNS message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    writer.write_all(&framed).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::rr::{
        rdata::{A, AAAA, CNAME},
        Record, RecordType,
    };

    use super::*;

    fn name(text: &str) -> Name {
        Name::from_ascii(text).expect("test names are valid")
    }

    fn reply_with(answers: Vec<Record>) -> Message {
        let mut reply = Message::new();
        reply.set_message_type(MessageType::Response);
        reply.add_query(Query::query(name("www.example.test."), RecordType::A));
        reply.add_answers(answers);
        reply
    }

    #[test]
    fn cname_chain_is_attributed_to_the_queried_name_with_smallest_ttl() {
        let reply = reply_with(vec![
            Record::from_rdata(name("WWW.example.test."), 300, RData::CNAME(CNAME(name("edge.cdn.test.")))),
            Record::from_rdata(name("edge.cdn.test."), 60, RData::CNAME(CNAME(name("pop.cdn.test.")))),
            Record::from_rdata(name("pop.cdn.test."), 120, RData::A(A(Ipv4Addr::new(192, 0, 2, 7)))),
            Record::from_rdata(name("pop.cdn.test."), 20, RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))),
            // Not on the chain: must not be attributed.
            Record::from_rdata(name("other.test."), 120, RData::A(A(Ipv4Addr::new(192, 0, 2, 99)))),
        ]);
        let addresses = answer_addresses(&reply, &name("www.example.test."));
        assert_eq!(
            addresses,
            vec![
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), Duration::from_mins(1)),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), Duration::from_secs(20)),
            ]
        );
    }

    #[test]
    fn cname_loop_terminates() {
        let reply = reply_with(vec![
            Record::from_rdata(name("www.example.test."), 300, RData::CNAME(CNAME(name("b.test.")))),
            Record::from_rdata(name("b.test."), 300, RData::CNAME(CNAME(name("www.example.test.")))),
        ]);
        assert!(answer_addresses(&reply, &name("www.example.test.")).is_empty());
    }

    #[test]
    fn absurd_counts_do_not_fit() {
        let mut header = Header::new();
        header.set_query_count(1);
        assert!(counts_fit(&header, 17));
        header.set_answer_count(u16::MAX);
        assert!(!counts_fit(&header, 512));
    }

    #[test]
    fn expected_reply_checks_id_and_question() {
        let mut query = Message::new();
        query.set_id(7).add_query(Query::query(name("www.example.test."), RecordType::A));
        let expected = ExpectedReply::from_query(&query.to_vec().expect("encodes")).expect("parses");

        let mut reply = query.clone();
        reply.set_message_type(MessageType::Response);
        reply.queries_mut()[0].set_name(name("WwW.ExAmple.TEST."));
        assert!(expected.matches(&reply.to_vec().expect("encodes")));

        let mut wrong_id = reply.clone();
        wrong_id.set_id(8);
        assert!(!expected.matches(&wrong_id.to_vec().expect("encodes")));

        let mut wrong_question = reply.clone();
        wrong_question.queries_mut()[0].set_query_type(RecordType::AAAA);
        assert!(!expected.matches(&wrong_question.to_vec().expect("encodes")));

        // Still a query, not a reply: a reflection of our own packet.
        assert!(!expected.matches(&query.to_vec().expect("encodes")));

        let mut bare_error = Message::error_msg(7, OpCode::Query, ResponseCode::FormErr);
        assert!(expected.matches(&bare_error.to_vec().expect("encodes")));
        bare_error.set_response_code(ResponseCode::NoError);
        assert!(!expected.matches(&bare_error.to_vec().expect("encodes")));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut query = Message::new();
        query.add_query(Query::query(name("www.example.test."), RecordType::A));
        let mut bytes = query.to_vec().expect("encodes");
        assert!(parse_exact(&bytes).is_ok());
        bytes.extend_from_slice(b"smuggled");
        assert_eq!(parse_exact(&bytes).err(), Some("trailing bytes after the message"));
    }
}
