//! Node-to-node wire format (issue 3's transport): frames and the connection handshake.
//!
//! A frame is `len: u32 LE | crc32: u32 LE | payload` where the payload is rkyv bytes
//! of a message, at most [`FRAME_PAYLOAD_BYTES_MAX`]. The first frame on every
//! connection is a [`Handshake`]; a node refuses a peer of another cluster, an unknown
//! node id, a different shard count or different cluster-wide settings (those shape
//! replicated state, so every replica must use the same ones).

use rkyv::{Archive, Deserialize, Serialize};

/// Bytes of the frame header (length + crc32).
pub const FRAME_HEADER_BYTES: usize = 8;
/// Largest frame payload; a peer announcing more is cut off (bounded memory).
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 32 << 20;
/// Version of the node-to-node protocol; peers must speak the same one.
/// 3: the handshake carries the process and data dir incarnations; forwarded requests
/// and replies carry a [`crate::peer::RequestId`] and the reply the request's crc;
/// heartbeats carry the leader's commit, rejections whether the member is catching up.
/// 4: forwarded ops and replies are the rkyv form of `crate::ops` itself (`crate::forward`).
pub const WIRE_VERSION: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length is 0 or above [`FRAME_PAYLOAD_BYTES_MAX`].
    LengthOutOfRange {
        len: u32,
    },
    CrcMismatch {
        stored: u32,
        computed: u32,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::LengthOutOfRange { len } => write!(
                f,
                "frame length {len} outside 1..={FRAME_PAYLOAD_BYTES_MAX}"
            ),
            FrameError::CrcMismatch { stored, computed } => {
                write!(
                    f,
                    "frame crc mismatch (stored {stored:#x}, computed {computed:#x})"
                )
            }
        }
    }
}

/// Appends one frame holding `payload` to `out`.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        !payload.is_empty() && payload.len() <= FRAME_PAYLOAD_BYTES_MAX,
        "frame payload of {} bytes",
        payload.len()
    );
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Reads the frame at the start of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((payload, consumed)))` for a whole frame, an error for a bad one (the
/// connection must then be closed: the stream can no longer be trusted).
pub fn decode_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    if len == 0 || len as usize > FRAME_PAYLOAD_BYTES_MAX {
        return Err(FrameError::LengthOutOfRange { len });
    }
    let end = FRAME_HEADER_BYTES + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let payload = &buf[FRAME_HEADER_BYTES..end];
    let stored = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(FrameError::CrcMismatch { stored, computed });
    }
    Ok(Some((payload, end)))
}

/// Settings that shape replicated state: equal on every node of a cluster.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Every member's node id, in id order: replica sets are computed from it, so two
    /// nodes with different member lists must not talk.
    pub members: Vec<u64>,
    pub dedupe_keys_max: u64,
    pub producers_max: u64,
    pub max_body_bytes: u64,
    /// Local retention (`--retention-bytes`, `--retention-age`; 0 = unlimited): what a
    /// reader finds expired should not depend on the node it asks.
    pub retention_bytes: u64,
    pub retention_age_ms: u64,
}

/// The first frame of every node-to-node connection.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub wire_version: u32,
    pub cluster_id: String,
    pub node_id: u64,
    pub shards: u32,
    /// The shard this connection belongs to (one connection per shard and peer).
    pub shard: u32,
    /// Random, new at every start of the process (never 0): frames queued for an earlier
    /// process of the same node are not delivered to this one, and the ids of requests
    /// this process forwards carry it, so a reply meant for an earlier process cannot
    /// complete a request of this one.
    pub incarnation: u64,
    pub settings: ClusterSettings,
    /// The random id of the sender's data dir, drawn when it was created: peers refuse
    /// a node they know that comes back with another one ([`check_data_incarnation`]).
    pub data_incarnation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    Undecodable(String),
    WireVersion {
        ours: u32,
        theirs: u32,
    },
    OtherCluster {
        ours: String,
        theirs: String,
    },
    UnknownNode {
        node_id: u64,
    },
    ShardCount {
        ours: u32,
        theirs: u32,
    },
    ShardMismatch {
        ours: u32,
        theirs: u32,
    },
    Settings {
        ours: Box<ClusterSettings>,
        theirs: Box<ClusterSettings>,
    },
    /// A node we know came back with another data dir: see [`check_data_incarnation`].
    NewDataDir {
        node_id: u64,
        theirs: u64,
        known: u64,
    },
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Undecodable(e) => write!(f, "handshake does not decode: {e}"),
            HandshakeError::WireVersion { ours, theirs } => {
                write!(f, "peer speaks wire version {theirs}, we speak {ours}")
            }
            HandshakeError::OtherCluster { ours, theirs } => {
                write!(f, "peer belongs to cluster {theirs:?}, we are {ours:?}")
            }
            HandshakeError::UnknownNode { node_id } => {
                write!(f, "node {node_id} is not a member of this cluster")
            }
            HandshakeError::ShardCount { ours, theirs } => {
                write!(f, "peer runs {theirs} shards, we run {ours}")
            }
            HandshakeError::ShardMismatch { ours, theirs } => {
                write!(f, "peer shard {theirs} connected to our shard {ours}")
            }
            HandshakeError::Settings { ours, theirs } => {
                write!(
                    f,
                    "cluster-wide settings differ: peer {theirs:?}, ours {ours:?}"
                )
            }
            HandshakeError::NewDataDir {
                node_id,
                theirs,
                known,
            } => write!(
                f,
                "node {node_id} came back with a new data dir (incarnation {theirs:016x}, we \
                 knew {known:016x}): it lost entries it may have acknowledged and the votes it \
                 cast, so it may not rejoin as it is. Stop it and start it with `starcite \
                 serve --rebuild --forget-votes --data-incarnation {known:016x}` while every \
                 other node is up (docs/deployment.md, \"Repairing a replica\")"
            ),
        }
    }
}

impl Handshake {
    pub fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .expect("serialising into memory")
            .to_vec()
    }

    /// Never panics on bad bytes.
    pub fn decode(bytes: &[u8]) -> Result<Handshake, HandshakeError> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Handshake, rkyv::rancor::Error>(&aligned)
            .map_err(|e| HandshakeError::Undecodable(e.to_string()))
    }

    /// Whether `theirs` may talk to us (`self`), given the cluster's members.
    pub fn accept(&self, theirs: &Handshake, members: &[u64]) -> Result<(), HandshakeError> {
        if theirs.wire_version != self.wire_version {
            return Err(HandshakeError::WireVersion {
                ours: self.wire_version,
                theirs: theirs.wire_version,
            });
        }
        if theirs.cluster_id != self.cluster_id {
            return Err(HandshakeError::OtherCluster {
                ours: self.cluster_id.clone(),
                theirs: theirs.cluster_id.clone(),
            });
        }
        if theirs.node_id == self.node_id || !members.contains(&theirs.node_id) {
            return Err(HandshakeError::UnknownNode {
                node_id: theirs.node_id,
            });
        }
        if theirs.shards != self.shards {
            return Err(HandshakeError::ShardCount {
                ours: self.shards,
                theirs: theirs.shards,
            });
        }
        if theirs.shard != self.shard {
            return Err(HandshakeError::ShardMismatch {
                ours: self.shard,
                theirs: theirs.shard,
            });
        }
        if theirs.settings != self.settings {
            return Err(HandshakeError::Settings {
                ours: Box::new(self.settings.clone()),
                theirs: Box::new(theirs.settings.clone()),
            });
        }
        Ok(())
    }
}

/// A data dir deleted and created afresh has lost what its node promised (acknowledged
/// entries, votes: Raft §5.2, §5.3): its node may rejoin only through the repair of
/// `starcite serve --rebuild --forget-votes`, which takes the old incarnation back.
/// `known`: the incarnation we last accepted for that node, None if we never met it.
pub fn check_data_incarnation(
    theirs: &Handshake,
    known: Option<u64>,
) -> Result<(), HandshakeError> {
    match known {
        Some(known) if known != theirs.data_incarnation => Err(HandshakeError::NewDataDir {
            node_id: theirs.node_id,
            theirs: theirs.data_incarnation,
            known,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> Handshake {
        Handshake {
            wire_version: WIRE_VERSION,
            cluster_id: "c1".into(),
            node_id: 1,
            shards: 2,
            shard: 0,
            incarnation: 7,
            settings: ClusterSettings {
                members: vec![1, 2, 3],
                dedupe_keys_max: 10_000,
                producers_max: 10_000,
                max_body_bytes: 1 << 20,
                retention_bytes: 0,
                retention_age_ms: 0,
            },
            data_incarnation: 0xA1,
        }
    }

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let mut stream = Vec::new();
        encode_frame(b"hello", &mut stream);
        encode_frame(&[7u8; 1000], &mut stream);
        for cut in 0..FRAME_HEADER_BYTES + 5 {
            assert_eq!(decode_frame(&stream[..cut]).unwrap(), None, "cut {cut}");
        }
        let (first, used) = decode_frame(&stream).unwrap().unwrap();
        assert_eq!(first, b"hello");
        let (second, used2) = decode_frame(&stream[used..]).unwrap().unwrap();
        assert_eq!(second, &[7u8; 1000][..]);
        assert_eq!(used + used2, stream.len());
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut stream = Vec::new();
        encode_frame(b"hello", &mut stream);
        let mut flipped = stream.clone();
        flipped[9] ^= 1;
        assert!(matches!(
            decode_frame(&flipped),
            Err(FrameError::CrcMismatch { .. })
        ));
        let mut huge = stream.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame(&huge),
            Err(FrameError::LengthOutOfRange { .. })
        ));
        let zero = [0u8; 8];
        assert!(decode_frame(&zero).is_err());
    }

    #[test]
    fn handshake_round_trips_and_garbage_is_an_error() {
        let h = ours();
        assert_eq!(Handshake::decode(&h.encode()).unwrap(), h);
        assert!(Handshake::decode(b"garbage").is_err());
        let bytes = h.encode();
        for cut in 0..bytes.len() {
            assert!(Handshake::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn handshake_refuses_other_cluster_unknown_node_and_shard_count() {
        let members = [1, 2, 3];
        let peer = Handshake {
            node_id: 2,
            ..ours()
        };
        assert_eq!(ours().accept(&peer, &members), Ok(()));
        let other = Handshake {
            cluster_id: "c2".into(),
            ..peer.clone()
        };
        assert!(matches!(
            ours().accept(&other, &members),
            Err(HandshakeError::OtherCluster { .. })
        ));
        let stranger = Handshake {
            node_id: 9,
            ..peer.clone()
        };
        assert!(matches!(
            ours().accept(&stranger, &members),
            Err(HandshakeError::UnknownNode { .. })
        ));
        let shards = Handshake {
            shards: 3,
            ..peer.clone()
        };
        assert!(matches!(
            ours().accept(&shards, &members),
            Err(HandshakeError::ShardCount { .. })
        ));
        let mut settings = peer.clone();
        settings.settings.dedupe_keys_max = 5;
        assert!(matches!(
            ours().accept(&settings, &members),
            Err(HandshakeError::Settings { .. })
        ));
        // A node configured with another member list computes other replica sets.
        let mut other_members = peer.clone();
        other_members.settings.members = vec![1, 2, 3, 4];
        assert!(matches!(
            ours().accept(&other_members, &members),
            Err(HandshakeError::Settings { .. })
        ));
        let itself = ours();
        assert!(ours().accept(&itself, &members).is_err());
    }

    #[test]
    fn a_known_node_with_a_new_data_dir_is_refused_naming_the_repair() {
        let peer = Handshake {
            node_id: 3,
            data_incarnation: 0xB2,
            ..ours()
        };
        assert_eq!(check_data_incarnation(&peer, None), Ok(()), "never met");
        assert_eq!(
            check_data_incarnation(&peer, Some(0xB2)),
            Ok(()),
            "the same"
        );
        let refused = check_data_incarnation(&peer, Some(0xC3)).unwrap_err();
        assert_eq!(
            refused,
            HandshakeError::NewDataDir {
                node_id: 3,
                theirs: 0xB2,
                known: 0xC3
            }
        );
        let text = refused.to_string();
        assert!(
            text.contains("node 3 came back with a new data dir")
                && text.contains("--rebuild --forget-votes --data-incarnation 00000000000000c3"),
            "{text}"
        );
    }
}
