//! Checking a trail offline (`sluice audit verify`): the hash chain across
//! files, the checkpoints' signatures with public keys only, and how the
//! trail ends. Pure over the files' bytes; nothing here needs the daemon.
//!
//! The first problem is named by file, line and seq, with what it looks
//! like: an edited record (the next one carries another hash of it), a
//! dropped one (a gap in `seq`), an inserted one (the chain links past
//! it), a reordered one (a `seq` out of place whose successor is further
//! on), a line that is no record, a checkpoint with a bad signature or by
//! a key not given, and a truncated tail. After a problem the checker
//! resynchronises on the next line that links, so one edit is one problem.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use super::{
    chain::{checkpoint_message, line_hash, GENESIS},
    key::PublicKey,
};

/// What kind of problem a line shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    Edited,
    Dropped,
    Inserted,
    Reordered,
    Invalid,
    BadSignature,
    UnknownKey,
    Truncated,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Edited => "edited",
            Self::Dropped => "dropped",
            Self::Inserted => "inserted",
            Self::Reordered => "reordered",
            Self::Invalid => "invalid",
            Self::BadSignature => "bad signature",
            Self::UnknownKey => "unknown key",
            Self::Truncated => "truncated",
        })
    }
}

/// A line and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub place: Place,
    /// The seq of the record named (the edited, dropped ... one).
    pub seq: Option<u64>,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.place)?;
        if let Some(seq) = self.seq {
            write!(f, "seq {seq}: ")?;
        }
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// How the trail ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// No lines.
    Empty,
    /// With the final checkpoint of a clean stop.
    CleanStop,
    /// With a checkpoint (the writer may still be running, or stopped
    /// right after it without closing).
    Checkpoint,
    /// With lines after the last checkpoint: chained, not signed (the
    /// writer is running, or stopped without its final checkpoint).
    Unsigned { lines: u64, first_seq: u64, last_seq: u64 },
    /// With a partial line.
    Truncated,
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("empty"),
            Self::CleanStop => f.write_str("with the final checkpoint of a clean stop"),
            Self::Checkpoint => f.write_str("with a signed checkpoint (the log was not closed after it)"),
            Self::Unsigned { lines, first_seq, last_seq } => write!(
                f,
                "with {lines} lines after the last checkpoint (seq {first_seq}..{last_seq}): chained, not yet signed \
                 (the daemon is running, or stopped without its final checkpoint)"
            ),
            Self::Truncated => f.write_str("with a truncated partial line"),
        }
    }
}

/// What `verify` found.
#[derive(Debug, Clone)]
pub struct Report {
    pub files: usize,
    pub lines: u64,
    /// Lines that are records (not checkpoints).
    pub records: u64,
    pub checkpoints: u64,
    /// Checkpoints whose signature was checked and holds.
    pub checkpoints_verified: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
    /// The first line is the first of a chain (seq 1, `prev` zeros).
    pub from_genesis: bool,
    pub ending: Ending,
    pub problems: Vec<Problem>,
    /// Facts that are not failures (partial lines the writer declared).
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, problem) in self.problems.iter().enumerate() {
            let label = if n == 0 { "FIRST PROBLEM" } else { "problem" };
            writeln!(f, "{label}: {problem}")?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        writeln!(
            f,
            "lines: {} in {} files ({} records, {} checkpoints, {} signatures verified)",
            self.lines, self.files, self.records, self.checkpoints, self.checkpoints_verified
        )?;
        if let (Some(first), Some(last)) = (self.first_seq, self.last_seq) {
            writeln!(f, "seq: {first}..{last}")?;
        }
        if let (Some(first), Some(last)) = (&self.first_time, &self.last_time) {
            writeln!(f, "time: {first} .. {last}")?;
        }
        if self.first_seq.is_some() {
            if self.from_genesis {
                writeln!(f, "starts: at the beginning of the chain")?;
            } else {
                writeln!(f, "starts: within the chain (earlier lines are not in the files given, e.g. rotated away)")?;
            }
        }
        writeln!(f, "ends: {}", self.ending)?;
        if self.ok() {
            write!(f, "result: OK")
        } else {
            write!(f, "result: FAILED ({} problems)", self.problems.len())
        }
    }
}

/// One line of the trail as read.
struct Raw {
    place: Place,
    bytes: Vec<u8>,
    /// Ends with a newline.
    whole: bool,
}

/// The chain fields of a line.
struct Link {
    seq: u64,
    prev: [u8; 32],
    torn: Option<u64>,
    time: Option<String>,
    checkpoint: Option<Checkpoint>,
}

struct Checkpoint {
    key_id: String,
    time: String,
    is_final: bool,
    signature: Vec<u8>,
}

fn parse(bytes: &[u8]) -> Result<Link, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let seq = object.get("seq").and_then(serde_json::Value::as_u64).ok_or("no seq")?;
    let mut prev = [0u8; 32];
    let prev_text = object.get("prev").and_then(serde_json::Value::as_str).ok_or("no prev")?;
    hex::decode_to_slice(prev_text, &mut prev).map_err(|_| "prev is not a SHA-256 in hex")?;
    let torn = object.get("torn").and_then(serde_json::Value::as_u64);
    let time = object.get("time").and_then(serde_json::Value::as_str).map(str::to_owned);
    let checkpoint = match object.get("checkpoint") {
        None => None,
        Some(c) => {
            let text = |name: &str| c.get(name).and_then(serde_json::Value::as_str).map(str::to_owned);
            let signature =
                text("signature").and_then(|s| hex::decode(s).ok()).ok_or("checkpoint without signature")?;
            Some(Checkpoint {
                key_id: text("key_id").ok_or("checkpoint without key_id")?,
                time: text("time").ok_or("checkpoint without time")?,
                is_final: c.get("final").and_then(serde_json::Value::as_bool).unwrap_or(false),
                signature,
            })
        }
    };
    Ok(Link { seq, prev, torn, time, checkpoint })
}

/// Reads `paths` and verifies them as one trail. Files are put in the
/// order of their first `seq` (so `decisions.jsonl*` in any order works).
pub fn verify_files(paths: &[PathBuf], keys: &[PublicKey]) -> std::io::Result<Report> {
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let bytes =
            std::fs::read(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let first_seq = bytes.split(|&b| b == b'\n').find_map(|line| parse(line).ok()).map(|l| l.seq);
        files.push((first_seq, path.clone(), bytes));
    }
    files.sort_by_key(|(first, _, _)| *first);
    let count = files.len();
    let mut raws = Vec::new();
    for (_, path, bytes) in files {
        raws.extend(split_lines(&path, &bytes));
    }
    let mut report = check(&raws, keys);
    report.files = count;
    Ok(report)
}

fn split_lines(path: &Path, bytes: &[u8]) -> Vec<Raw> {
    let mut lines = Vec::new();
    let mut rest = bytes;
    let mut number = 0;
    while !rest.is_empty() {
        number += 1;
        let place = Place { file: path.to_owned(), line: number };
        if let Some(end) = rest.iter().position(|&b| b == b'\n') {
            lines.push(Raw { place, bytes: rest[..end].to_vec(), whole: true });
            rest = &rest[end + 1..];
        } else {
            lines.push(Raw { place, bytes: rest.to_vec(), whole: false });
            rest = &[];
        }
    }
    lines
}

#[allow(clippy::too_many_lines)] // One pass with its cases side by side.
fn check(raws: &[Raw], keys: &[PublicKey]) -> Report {
    let links: Vec<Result<Link, String>> = raws.iter().map(|r| parse(&r.bytes)).collect();
    let hashes: Vec<[u8; 32]> = raws.iter().map(|r| line_hash(&r.bytes)).collect();
    let mut by_hash: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, hash) in hashes.iter().enumerate() {
        by_hash.entry(*hash).or_insert(i);
    }
    let mut report = Report {
        files: 0,
        lines: raws.len() as u64,
        records: 0,
        checkpoints: 0,
        checkpoints_verified: 0,
        first_seq: None,
        last_seq: None,
        first_time: None,
        last_time: None,
        from_genesis: false,
        ending: Ending::Empty,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let problem = |report: &mut Report, kind, at: usize, seq, detail: String| {
        report.problems.push(Problem { kind, place: raws[at].place.clone(), seq, detail });
    };
    // The last line in the chain, and whether the next is a resync.
    let mut last: Option<usize> = None;
    let mut resync = false;
    let mut last_checkpoint: Option<usize> = None;
    for (i, raw) in raws.iter().enumerate() {
        let link = match &links[i] {
            Ok(link) => link,
            Err(why) => {
                let declared = links.get(i + 1).and_then(|l| l.as_ref().ok()).and_then(|l| l.torn);
                if !raw.whole && i + 1 == raws.len() {
                    problem(
                        &mut report,
                        ProblemKind::Truncated,
                        i,
                        None,
                        format!("the trail ends in a partial line of {} bytes", raw.bytes.len()),
                    );
                    report.ending = Ending::Truncated;
                } else if declared == Some(raw.bytes.len() as u64) {
                    report.notes.push(format!(
                        "{}: a partial line of {} bytes the writer could not finish, declared by the next line",
                        raw.place,
                        raw.bytes.len()
                    ));
                } else {
                    problem(&mut report, ProblemKind::Invalid, i, None, format!("not a chained record: {why}"));
                    resync = true;
                }
                continue;
            }
        };
        if !raw.whole {
            problem(
                &mut report,
                ProblemKind::Truncated,
                i,
                Some(link.seq),
                "the last line has no newline: the trail was cut".into(),
            );
            report.ending = Ending::Truncated;
        }
        match last {
            None => {
                report.from_genesis = link.seq == 1 && link.prev == GENESIS;
                report.first_seq = Some(link.seq);
            }
            Some(p) => {
                let before = links[p].as_ref().map(|l| l.seq).unwrap_or_default();
                let expected = before + 1;
                let linked = link.prev == hashes[p];
                if resync {
                    if !linked && !by_hash.contains_key(&link.prev) {
                        problem(
                            &mut report,
                            ProblemKind::Edited,
                            i,
                            Some(link.seq),
                            "its prev matches no line of the trail".into(),
                        );
                    }
                    resync = !linked;
                } else if linked && link.seq != expected {
                    problem(
                        &mut report,
                        ProblemKind::Edited,
                        i,
                        Some(link.seq),
                        format!("its hash link is intact but its seq is not (seq {expected} expected)"),
                    );
                    resync = true;
                } else if !linked {
                    let successor = (i + 1..raws.len())
                        .find(|&j| links[j].as_ref().is_ok_and(|l| l.seq == expected && l.prev == hashes[p]));
                    let skipped_by_next =
                        links.get(i + 1).and_then(|l| l.as_ref().ok()).is_some_and(|l| l.prev == hashes[p]);
                    let links_back = by_hash.get(&link.prev).copied().filter(|&j| j < p);
                    if let (Some(j), true) = (successor, link.seq != expected) {
                        problem(
                            &mut report,
                            ProblemKind::Reordered,
                            i,
                            Some(link.seq),
                            format!(
                                "out of order: seq {expected}, which comes before it, is further on at {}",
                                raws[j].place
                            ),
                        );
                    } else if skipped_by_next {
                        problem(
                            &mut report,
                            ProblemKind::Inserted,
                            i,
                            Some(link.seq),
                            format!("not in the chain: the next line links to {} before it", raws[p].place),
                        );
                        // The chain goes on past the inserted line.
                        continue;
                    } else if let Some(j) = links_back {
                        problem(
                            &mut report,
                            ProblemKind::Inserted,
                            j + 1,
                            links[j + 1].as_ref().ok().map(|l| l.seq),
                            format!(
                                "lines {}..{} are not in the chain: {} (seq {}) links to {}",
                                raws[j + 1].place,
                                raws[p].place.line,
                                raw.place,
                                link.seq,
                                raws[j].place
                            ),
                        );
                    } else if link.seq == expected {
                        problem(
                            &mut report,
                            ProblemKind::Edited,
                            p,
                            Some(before),
                            format!("the next line ({}, seq {}) carries another hash of it", raw.place, link.seq),
                        );
                    } else if link.seq > expected {
                        problem(
                            &mut report,
                            ProblemKind::Dropped,
                            i,
                            Some(expected),
                            format!(
                                "seq {expected}..{} missing between {} and {}",
                                link.seq - 1,
                                raws[p].place,
                                raw.place
                            ),
                        );
                    } else {
                        problem(
                            &mut report,
                            ProblemKind::Reordered,
                            i,
                            Some(link.seq),
                            format!("out of order: seq {} after seq {before}", link.seq),
                        );
                    }
                    resync = true;
                }
            }
        }
        last = Some(i);
        report.last_seq = Some(link.seq);
        if let Some(checkpoint) = &link.checkpoint {
            report.checkpoints += 1;
            let message = checkpoint_message(link.seq, &hex::encode(link.prev), &checkpoint.time, &checkpoint.key_id);
            match keys.iter().find(|k| k.id() == checkpoint.key_id) {
                _ if keys.is_empty() => {}
                None => problem(
                    &mut report,
                    ProblemKind::UnknownKey,
                    i,
                    Some(link.seq),
                    format!("checkpoint signed by key {}, which is not a key given", checkpoint.key_id),
                ),
                Some(key) if key.verifies(&message, &checkpoint.signature) => {
                    report.checkpoints_verified += 1;
                    last_checkpoint = Some(i);
                }
                Some(_) => problem(
                    &mut report,
                    ProblemKind::BadSignature,
                    i,
                    Some(link.seq),
                    format!("checkpoint signature does not verify with key {}", checkpoint.key_id),
                ),
            }
            if keys.is_empty() {
                last_checkpoint = Some(i);
            }
        } else {
            report.records += 1;
        }
        if let Some(time) = link.checkpoint.as_ref().map(|c| &c.time).or(link.time.as_ref()) {
            if report.first_time.is_none() {
                report.first_time = Some(time.clone());
            }
            report.last_time = Some(time.clone());
        }
    }
    if keys.is_empty() && report.checkpoints > 0 {
        report.notes.push("checkpoint signatures were NOT checked: no --key given".into());
    }
    if report.ending != Ending::Truncated {
        report.ending = match (last, last_checkpoint) {
            (None, _) => Ending::Empty,
            (Some(l), Some(c)) if l == c => {
                let is_final = links[c].as_ref().ok().and_then(|l| l.checkpoint.as_ref()).is_some_and(|c| c.is_final);
                if is_final {
                    Ending::CleanStop
                } else {
                    Ending::Checkpoint
                }
            }
            (Some(l), c) => {
                let seq_of = |i: usize| links[i].as_ref().map(|l| l.seq).unwrap_or_default();
                let first_index = c.map_or(0, |c| c + 1);
                let first = (first_index..=l).find(|&i| links[i].is_ok()).unwrap_or(l);
                let unsigned = (first_index..=l).filter(|&i| links[i].is_ok()).count() as u64;
                Ending::Unsigned { lines: unsigned, first_seq: seq_of(first), last_seq: seq_of(l) }
            }
        };
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{chain::ChainHead, key::AuditKey};

    /// A trail of `n` records with a checkpoint after every 4th line and a
    /// final one, as lines.
    fn trail(key: &AuditKey, n: usize) -> Vec<Vec<u8>> {
        let mut head = ChainHead::default();
        let mut out = Vec::new();
        for i in 0..n {
            head.seal(format!(r#"{{"time":"t{i}","rule":"r{i}"}}"#).as_bytes(), &mut out);
            if head.since_checkpoint == 4 {
                head.seal_checkpoint(key, &format!("c{i}"), false, br#"{"rule":"audit-checkpoint"}"#, &mut out);
            }
        }
        head.seal_checkpoint(key, "end", true, br#"{"rule":"audit-checkpoint"}"#, &mut out);
        out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
    }

    fn run(lines: &[Vec<u8>], partial_tail: bool, keys: &[PublicKey]) -> Report {
        let mut bytes = lines.join(&b'\n');
        if !partial_tail {
            bytes.push(b'\n');
        }
        check(&split_lines(Path::new("t"), &bytes), keys)
    }

    fn first(report: &Report) -> (ProblemKind, usize, Option<u64>) {
        let p = report.problems.first().unwrap_or_else(|| panic!("no problem found:\n{report}"));
        (p.kind, p.place.line, p.seq)
    }

    #[test]
    fn a_clean_trail_verifies_and_ends_clean() {
        let key = AuditKey::generate().unwrap();
        let report = run(&trail(&key, 10), false, &[key.public()]);
        assert!(report.ok(), "{report}");
        assert_eq!((report.records, report.checkpoints, report.checkpoints_verified), (10, 3, 3));
        assert_eq!(report.ending, Ending::CleanStop);
        assert!(report.from_genesis);
        assert_eq!((report.first_time.as_deref(), report.last_time.as_deref()), (Some("t0"), Some("end")));
    }

    #[test]
    fn each_tampering_is_named_where_it_is() {
        let key = AuditKey::generate().unwrap();
        let keys = [key.public()];
        let lines = trail(&key, 12);
        // Line 3 is seq 3.
        let mut edited = lines.clone();
        let at = edited[2].len() - 3;
        edited[2][at] ^= 1;
        assert_eq!(first(&run(&edited, false, &keys)), (ProblemKind::Edited, 3, Some(3)));

        let mut dropped = lines.clone();
        dropped.remove(2);
        assert_eq!(first(&run(&dropped, false, &keys)), (ProblemKind::Dropped, 3, Some(3)));

        let mut swapped = lines.clone();
        swapped.swap(2, 3);
        let report = run(&swapped, false, &keys);
        assert_eq!(first(&report), (ProblemKind::Reordered, 3, Some(4)));
        assert_eq!(report.problems.len(), 1, "{report}");

        let mut inserted = lines.clone();
        inserted.insert(2, format!(r#"{{"seq":3,"prev":"{}","rule":"forged"}}"#, "1".repeat(64)).into_bytes());
        assert_eq!(first(&run(&inserted, false, &keys)), (ProblemKind::Inserted, 3, Some(3)));

        // A forger who chains the inserted line properly is caught by the
        // line after it.
        let mut head = ChainHead { seq: 2, hash: line_hash(&lines[1]), ..ChainHead::default() };
        let mut forged = Vec::new();
        head.seal(br#"{"rule":"forged"}"#, &mut forged);
        forged.pop();
        let mut inserted = lines.clone();
        inserted.insert(2, forged);
        let report = run(&inserted, false, &keys);
        assert_eq!(first(&report), (ProblemKind::Inserted, 3, Some(3)), "{report}");

        let report = run(&lines[..lines.len() - 1], false, &keys);
        assert!(report.ok(), "{report}");
        assert!(matches!(report.ending, Ending::Unsigned { lines: 0, .. } | Ending::Checkpoint), "{report}");

        let mut truncated = lines.clone();
        let last = truncated.last_mut().unwrap();
        last.truncate(last.len() / 2);
        let report = run(&truncated, true, &keys);
        assert_eq!(first(&report), (ProblemKind::Truncated, lines.len(), None));
        assert_eq!(report.ending, Ending::Truncated);

        let other = AuditKey::generate().unwrap();
        let report = run(&trail(&other, 12), false, &keys);
        assert_eq!(first(&report), (ProblemKind::UnknownKey, 5, Some(5)));
    }

    #[test]
    fn a_partial_line_the_writer_declared_is_a_note() {
        let key = AuditKey::generate().unwrap();
        let mut head = ChainHead::default();
        let mut out = Vec::new();
        head.seal(br#"{"rule":"a"}"#, &mut out);
        out.extend_from_slice(b"{\"seq\":2,\"pr\n");
        head.torn = 12;
        head.seal(br#"{"rule":"b"}"#, &mut out);
        let report = check(&split_lines(Path::new("t"), &out), &[key.public()]);
        assert!(report.ok(), "{report}");
        assert_eq!(report.notes.len(), 1, "{report}");
    }
}
