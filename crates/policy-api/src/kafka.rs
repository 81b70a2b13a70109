//! Kafka API keys as Cilium's Kafka policy names them (`apiKey`), and the keys each `role`
//! stands for.

/// (name, numeric key) for the API keys Cilium's policy accepts.
pub const API_KEYS: &[(&str, i16)] = &[
    ("produce", 0),
    ("fetch", 1),
    ("offsets", 2),
    ("metadata", 3),
    ("leaderandisr", 4),
    ("stopreplica", 5),
    ("updatemetadata", 6),
    ("controlledshutdown", 7),
    ("offsetcommit", 8),
    ("offsetfetch", 9),
    ("findcoordinator", 10),
    ("joingroup", 11),
    ("heartbeat", 12),
    ("leavegroup", 13),
    ("syncgroup", 14),
    ("describegroups", 15),
    ("listgroups", 16),
    ("saslhandshake", 17),
    ("apiversions", 18),
    ("createtopics", 19),
    ("deletetopics", 20),
];

pub fn api_key_by_name(name: &str) -> Option<i16> {
    API_KEYS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, k)| *k)
}

/// Keys allowed by `role: produce`: produce, metadata, apiversions.
pub const PRODUCE_ROLE_KEYS: &[i16] = &[0, 3, 18];
/// Keys allowed by `role: consume`: fetch, offsets, metadata, offsetcommit, offsetfetch,
/// findcoordinator, joingroup, heartbeat, leavegroup, syncgroup, apiversions.
pub const CONSUME_ROLE_KEYS: &[i16] = &[1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18];
