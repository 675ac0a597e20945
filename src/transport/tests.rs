//! The transport over real loopback TCP: transports of several nodes on glommio
//! executors, plus raw TCP clients that misbehave on purpose.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::sleep;
use glommio::{LocalExecutorBuilder, Placement};
use shards::wire::{encode_frame, ClusterSettings, WIRE_VERSION};

use super::*;

/// Longer than anything here should take; waiting this long means the test failed.
const PATIENCE: Duration = Duration::from_secs(2);

/// Every transport a test starts is a new process: a new incarnation.
static NEXT_INCARNATION: AtomicUsize = AtomicUsize::new(1);

/// An address nobody listens on right now (bound, then released).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

fn handshake(node_id: u64, cluster_id: &str, shards: u32) -> Handshake {
    Handshake {
        wire_version: WIRE_VERSION,
        cluster_id: cluster_id.into(),
        node_id,
        shards,
        shard: 0,
        incarnation: NEXT_INCARNATION.fetch_add(1, Ordering::Relaxed) as u64,
        settings: ClusterSettings {
            members: vec![1, 2, 3],
            dedupe_keys_max: 1000,
            producers_max: 1000,
            max_body_bytes: 1 << 20,
            retention_bytes: 0,
            retention_age_ms: 0,
        },
        data_incarnation: 0x1000 + node_id,
    }
}

/// Node `node_id` of a one-shard cluster whose members live at `addrs` (ours included).
fn config(node_id: u64, addrs: &[(u64, SocketAddr)]) -> TransportConfig {
    let listen = addrs
        .iter()
        .find(|a| a.0 == node_id)
        .expect("own address")
        .1;
    TransportConfig {
        node_id,
        shard: 0,
        shards: 1,
        listen,
        peers: addrs.iter().copied().filter(|a| a.0 != node_id).collect(),
        members: addrs.iter().map(|a| a.0).collect(),
        handshake: handshake(node_id, "test", 1),
        send_queue_bytes_max: 1 << 20,
        reconnect_backoff_min: Duration::from_millis(10),
        reconnect_backoff_max: Duration::from_millis(100),
        incarnations_file: None,
    }
}

fn start(config: TransportConfig) -> (Rc<Transport>, LocalReceiver<Incoming>) {
    Transport::start(config).expect("transport starts")
}

fn run_local<Fut: Future<Output = ()>>(test: impl FnOnce() -> Fut) {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(256 << 10)
        .make()
        .expect("executor")
        .run(async move { test().await });
}

async fn recv_within(rx: &LocalReceiver<Incoming>, limit: Duration) -> Option<Incoming> {
    futures_lite::future::or(async { rx.recv().await }, async {
        sleep(limit).await;
        None
    })
    .await
}

async fn recv(rx: &LocalReceiver<Incoming>) -> Incoming {
    recv_within(rx, PATIENCE).await.expect("a frame in time")
}

/// Whether `cond` holds within `limit` (checked every few milliseconds).
async fn eventually(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        sleep(Duration::from_millis(5)).await;
    }
    cond()
}

fn msg(tag: &str, i: usize) -> Vec<u8> {
    format!("{tag}-{i}").into_bytes()
}

#[test]
fn frames_round_trip_both_ways_between_two_nodes() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (2, free_addr())];
        let (one, rx1) = start(config(1, &addrs));
        let (two, rx2) = start(config(2, &addrs));
        // Queued before the connection exists: delivered once it does, in order.
        for i in 0..500 {
            one.send(2, msg("to-2", i)).unwrap();
            two.send(1, msg("to-1", i)).unwrap();
        }
        for i in 0..500 {
            let m = recv(&rx2).await;
            assert_eq!((m.from, m.payload), (1, msg("to-2", i)));
            assert_eq!(Some(m.conn), two.connection(1));
            assert_eq!(recv(&rx1).await.payload, msg("to-1", i));
        }
        assert_eq!(one.connected_peers(), vec![2]);
        assert_eq!(two.connected_peers(), vec![1]);
        let (s1, s2) = (one.stats(), two.stats());
        assert_eq!((s1.frames_sent, s1.frames_received), (500, 500));
        assert_eq!(s1.bytes_sent, s2.bytes_received);
        assert_eq!(s2.bytes_sent, s1.bytes_received);
        assert!(
            s1.writes < 500,
            "500 queued frames took {} writes",
            s1.writes
        );
        assert_eq!((s1.connects, s1.reconnects, s1.frames_dropped), (1, 0, 0));
        assert_eq!(s1.queued_bytes, 0);
        assert_eq!(one.send(3, b"x".to_vec()), Err(SendError::UnknownPeer));
    });
}

#[test]
fn three_nodes_in_three_executors_form_a_full_mesh() {
    let addrs = [(1, free_addr()), (2, free_addr()), (3, free_addr())];
    let done = Arc::new(AtomicUsize::new(0));
    let nodes: Vec<_> = [1u64, 2, 3]
        .into_iter()
        .map(|id| {
            let done = done.clone();
            LocalExecutorBuilder::new(Placement::Unbound)
                .io_memory(256 << 10)
                .name(&format!("node-{id}"))
                .spawn(move || async move {
                    let (t, rx) = start(config(id, &addrs));
                    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&o| o != id).collect();
                    for i in 0..50 {
                        for &o in &others {
                            t.send(o, msg(&format!("{id}->{o}"), i)).unwrap();
                        }
                    }
                    let mut got: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
                    for _ in 0..100 {
                        let m = recv(&rx).await;
                        got.entry(m.from).or_default().push(m.payload);
                    }
                    for &o in &others {
                        let want: Vec<_> = (0..50).map(|i| msg(&format!("{o}->{id}"), i)).collect();
                        assert_eq!(got[&o], want, "node {id} from {o}");
                    }
                    assert_eq!(t.connected_peers(), others);
                    // Stay up until every node has everything it was sent.
                    done.fetch_add(1, Ordering::SeqCst);
                    assert!(eventually(PATIENCE, || done.load(Ordering::SeqCst) == 3).await);
                })
                .expect("executor")
        })
        .collect();
    for node in nodes {
        node.join().expect("node thread");
    }
}

/// Node 1 dials node 2, whose handshake does not fit ours: no frame may pass either
/// way, and node 1 keeps retrying at about the maximum backoff, not in a tight loop.
fn assert_refused_and_retried_slowly(two_handshake: Handshake, two_shards: u32) {
    run_local(|| async move {
        let addrs = [(1, free_addr()), (2, free_addr())];
        let (one, rx1) = start(config(1, &addrs));
        let mut cfg2 = config(2, &addrs);
        cfg2.shards = two_shards;
        cfg2.handshake = two_handshake;
        let (two, rx2) = start(cfg2);
        one.send(2, b"hello".to_vec()).unwrap();
        two.send(1, b"hello".to_vec()).unwrap();
        let watched = Duration::from_millis(700);
        let started = Instant::now();
        assert!(recv_within(&rx2, watched).await.is_none());
        assert!(recv_within(&rx1, Duration::from_millis(1)).await.is_none());
        let elapsed = started.elapsed();
        assert!(one.connected_peers().is_empty() && two.connected_peers().is_empty());
        // Waits after a refusal are 50..100 ms: at most ~15 tries in 700 ms.
        let (refused1, refused2) = (
            one.stats().handshakes_refused,
            two.stats().handshakes_refused,
        );
        let slow_retries = 2..=16;
        assert!(
            slow_retries.contains(&refused2),
            "node 2 refused {refused2} times in {elapsed:?}"
        );
        assert!(
            slow_retries.contains(&refused1),
            "node 1 saw {refused1} refusals in {elapsed:?}"
        );
        assert_eq!(one.stats().frames_received + two.stats().frames_received, 0);
    });
}

#[test]
fn a_peer_of_another_cluster_is_refused_and_retried_without_a_tight_loop() {
    assert_refused_and_retried_slowly(handshake(2, "another-cluster", 1), 1);
}

#[test]
fn a_peer_with_another_shard_count_is_refused_and_retried_without_a_tight_loop() {
    assert_refused_and_retried_slowly(handshake(2, "test", 2), 2);
}

#[test]
fn a_restarted_peer_is_reconnected_and_traffic_resumes() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (2, free_addr()), (3, free_addr())];
        let (one, rx1) = start(config(1, &addrs));
        let (three, rx3) = start(config(3, &addrs));
        for restart in 0..2 {
            // Node 2 is accepted by node 1 and dials node 3: both roles restart.
            let (two, rx2) = start(config(2, &addrs));
            let mut i = 0;
            while recv_within(&rx2, Duration::from_millis(20)).await.is_none() {
                i += 1;
                assert!(i < 100, "no frame reached node 2 after restart {restart}");
                let _ = one.send(2, b"ping".to_vec());
                let _ = three.send(2, b"ping".to_vec());
            }
            two.send(1, b"pong".to_vec()).unwrap();
            two.send(3, b"pong".to_vec()).unwrap();
            assert_eq!(recv_until(&rx1, b"pong").await.from, 2);
            assert_eq!(recv_until(&rx3, b"pong").await.from, 2);
            assert!(eventually(PATIENCE, || two.connected_peers() == vec![1, 3]).await);
            drop(two);
            drop(rx2);
            assert!(eventually(PATIENCE, || one.connected_peers() == vec![3]).await);
        }
        assert!(one.stats().reconnects >= 1);
        assert!(three.stats().reconnects >= 1);
    });
}

#[test]
fn frames_queued_for_a_peer_that_came_back_as_a_new_process_are_dropped() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (2, free_addr())];
        let (one, _rx1) = start(config(1, &addrs));
        let two_config = config(2, &addrs);
        for (restart, same_process) in [(0, true), (1, false)] {
            let (two, rx2) = start(two_config.clone());
            one.send(2, b"hello".to_vec()).unwrap();
            assert_eq!(recv_until(&rx2, b"hello").await.from, 1);
            drop(two);
            drop(rx2);
            assert!(eventually(PATIENCE, || one.connected_peers().is_empty()).await);
            one.send(2, msg("queued", restart)).unwrap();
            let mut back = two_config.clone();
            if !same_process {
                back.handshake.incarnation += 1_000_000;
            }
            let (two, rx2) = start(back);
            assert!(eventually(PATIENCE, || one.connected_peers() == vec![2]).await);
            one.send(2, msg("after", restart)).unwrap();
            let first = recv(&rx2).await;
            let expected = if same_process { "queued" } else { "after" };
            assert_eq!(first.payload, msg(expected, restart), "restart {restart}");
            drop(two);
            drop(rx2);
            assert!(eventually(PATIENCE, || one.connected_peers().is_empty()).await);
        }
    });
}

/// Node 2 comes back with another data dir incarnation: node 1 (which dials it) and
/// node 3 (which it dials) refuse it and tell it why; with its old incarnation again
/// (`--data-incarnation`) it is accepted.
#[test]
fn a_known_peer_back_with_a_new_data_dir_is_refused_and_told_why() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (2, free_addr()), (3, free_addr())];
        let (one, rx1) = start(config(1, &addrs));
        let (three, rx3) = start(config(3, &addrs));
        let two_as = |incarnation: u64| {
            let mut cfg = config(2, &addrs);
            cfg.handshake.data_incarnation = incarnation;
            start(cfg)
        };
        let (two, rx2) = two_as(0xA);
        two.send(1, b"hi".to_vec()).unwrap();
        two.send(3, b"hi".to_vec()).unwrap();
        assert_eq!(recv_until(&rx1, b"hi").await.from, 2);
        assert_eq!(recv_until(&rx3, b"hi").await.from, 2);
        drop(two);
        drop(rx2);

        let (two, rx2) = two_as(0xB);
        let _ = one.send(2, b"ping".to_vec());
        let _ = three.send(2, b"ping".to_vec());
        two.send(1, b"lost".to_vec()).unwrap();
        assert!(recv_within(&rx2, Duration::from_millis(700))
            .await
            .is_none());
        assert!(recv_within(&rx1, Duration::from_millis(1)).await.is_none());
        let refused = two.refused_by();
        assert_eq!(refused.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
        for reason in refused.values() {
            assert!(
                reason.contains("node 2 came back with a new data dir (incarnation 000000000000000b, we knew 000000000000000a)")
                    && reason.contains("--rebuild --forget-votes --data-incarnation 000000000000000a"),
                "{reason}"
            );
        }
        assert!(one.stats().new_data_dir_refusals >= 1);
        assert!(three.stats().new_data_dir_refusals >= 1);
        assert_eq!(one.connected_peers(), vec![3], "not to node 2");
        drop(two);
        drop(rx2);

        let (two, rx2) = two_as(0xA);
        two.send(3, b"back".to_vec()).unwrap();
        assert_eq!(recv_until(&rx3, b"back").await.from, 2);
        // (Frames queued before it connects were meant for its earlier process.)
        assert!(eventually(PATIENCE, || one.connected_peers() == vec![2, 3]).await);
        let _ = one.send(2, b"welcome".to_vec());
        assert_eq!(recv_until(&rx2, b"welcome").await.from, 1);
        assert!(eventually(PATIENCE, || two.refused_by().is_empty()).await);
    });
}

/// The first frame with `payload`, skipping others (pings left over from retries).
async fn recv_until(rx: &LocalReceiver<Incoming>, payload: &[u8]) -> Incoming {
    loop {
        let m = recv(rx).await;
        if m.payload == payload {
            return m;
        }
    }
}

#[test]
fn the_send_queue_is_bounded_while_the_peer_is_down() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (2, free_addr())];
        let mut cfg = config(1, &addrs);
        cfg.send_queue_bytes_max = 10_000;
        let (one, _rx1) = start(cfg);
        let frame = vec![7u8; 1000];
        let mut accepted = 0;
        for _ in 0..100 {
            match one.send(2, frame.clone()) {
                Ok(()) => accepted += 1,
                Err(e) => assert_eq!(e, SendError::Full),
            }
        }
        // 1008 bytes per frame with its header: 9 fit in 10,000.
        assert_eq!(accepted, 9);
        let stats = one.stats();
        assert_eq!((stats.queued_bytes, stats.frames_dropped), (9 * 1008, 91));
        sleep(Duration::from_millis(100)).await;
        assert!(one.stats().queued_bytes <= 10_000);
        assert!(one.stats().dial_failures >= 1);
        // Once the peer is up, the queued frames go out and the queue is usable again.
        let (_two, rx2) = start(config(2, &addrs));
        for _ in 0..9 {
            assert_eq!(recv(&rx2).await.payload, frame);
        }
        assert!(eventually(PATIENCE, || one.stats().queued_bytes == 0).await);
        one.send(2, frame.clone()).unwrap();
        assert_eq!(recv(&rx2).await.payload, frame);
    });
}

/// A raw client that handshakes as `node_id` with the transport at `addr`.
async fn raw_peer(node_id: u64, addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut hello = Vec::new();
    encode_frame(&handshake(node_id, "test", 1).encode(), &mut hello);
    stream.write_all(&hello).await.unwrap();
    let mut header = [0u8; FRAME_HEADER_BYTES];
    stream
        .read_exact(&mut header)
        .await
        .expect("handshake answer");
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let mut answer = vec![0u8; len];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(Handshake::decode(&answer).unwrap().node_id, 3);
    stream
}

/// Whether the transport closed `stream` (end of stream, or a reset).
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let read = futures_lite::future::or(async { Some(stream.read(&mut buf).await) }, async {
        sleep(PATIENCE).await;
        None
    });
    matches!(read.await, Some(Ok(0)) | Some(Err(_)))
}

#[test]
fn a_corrupted_frame_closes_only_that_connection() {
    run_local(|| async {
        // Node 2 is played by a raw client; node 3 accepts both it and node 1.
        let addrs = [(1, free_addr()), (2, free_addr()), (3, free_addr())];
        let (one, _rx1) = start(config(1, &addrs));
        let (three, rx3) = start(config(3, &addrs));
        let mut raw = raw_peer(2, addrs[2].1).await;
        let mut good = Vec::new();
        encode_frame(b"valid", &mut good);
        raw.write_all(&good).await.unwrap();
        let m = recv(&rx3).await;
        assert_eq!((m.from, m.payload), (2, b"valid".to_vec()));
        let mut bad = Vec::new();
        encode_frame(b"corrupt", &mut bad);
        bad[FRAME_HEADER_BYTES] ^= 0xff;
        raw.write_all(&bad).await.unwrap();
        assert!(closed_by_peer(&mut raw).await, "bad crc did not close");
        assert_eq!(three.stats().frame_errors, 1);
        assert!(eventually(PATIENCE, || three.connected_peers() == vec![1]).await);
        one.send(3, b"still fine".to_vec()).unwrap();
        assert_eq!(recv(&rx3).await.payload, b"still fine");
        // A length beyond the bound closes too.
        let mut raw = raw_peer(2, addrs[2].1).await;
        raw.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        raw.write_all(&[0u8; 4]).await.unwrap();
        assert!(closed_by_peer(&mut raw).await, "bad length did not close");
        assert_eq!(three.stats().frame_errors, 2);
        assert_eq!(three.connected_peers(), vec![1]);
    });
}

#[test]
fn a_second_connection_from_a_peer_replaces_the_first() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (2, free_addr()), (3, free_addr())];
        let (three, rx3) = start(config(3, &addrs));
        let mut first = raw_peer(2, addrs[2].1).await;
        assert!(eventually(PATIENCE, || three.connected_peers().contains(&2)).await);
        let mut second = raw_peer(2, addrs[2].1).await;
        assert!(
            closed_by_peer(&mut first).await,
            "the old connection stays open"
        );
        three.send(2, b"to the newest".to_vec()).unwrap();
        let mut header = [0u8; FRAME_HEADER_BYTES];
        second.read_exact(&mut header).await.unwrap();
        let mut payload = vec![0u8; u32::from_le_bytes(header[..4].try_into().unwrap()) as usize];
        second.read_exact(&mut payload).await.unwrap();
        assert_eq!(payload, b"to the newest");
        let mut frame = Vec::new();
        encode_frame(b"from the newest", &mut frame);
        second.write_all(&frame).await.unwrap();
        assert_eq!(recv(&rx3).await.payload, b"from the newest");
    });
}

#[test]
fn a_stranger_is_refused_by_the_acceptor() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (3, free_addr())];
        let (three, rx3) = start(config(3, &addrs));
        let mut stranger = TcpStream::connect(addrs[1].1).await.expect("connect");
        let mut hello = Vec::new();
        encode_frame(&handshake(9, "test", 1).encode(), &mut hello);
        stranger.write_all(&hello).await.unwrap();
        assert!(closed_by_peer(&mut stranger).await);
        assert_eq!(three.stats().handshakes_refused, 1);
        assert!(recv_within(&rx3, Duration::from_millis(20)).await.is_none());
    });
}

#[test]
fn a_higher_node_dialling_a_lower_one_is_refused() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (2, free_addr()), (3, free_addr())];
        let (one, rx1) = start(config(1, &addrs));
        let mut wrong_way = TcpStream::connect(addrs[0].1).await.expect("connect");
        let mut hello = Vec::new();
        encode_frame(&handshake(3, "test", 1).encode(), &mut hello);
        wrong_way.write_all(&hello).await.unwrap();
        assert!(closed_by_peer(&mut wrong_way).await);
        assert_eq!(one.stats().handshakes_refused, 1);
        assert!(one.connected_peers().is_empty());
        assert!(recv_within(&rx1, Duration::from_millis(20)).await.is_none());
    });
}

#[test]
fn shutdown_closes_connections_and_ends_the_incoming_channel() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (2, free_addr())];
        let (one, _rx1) = start(config(1, &addrs));
        let (two, rx2) = start(config(2, &addrs));
        one.send(2, b"x".to_vec()).unwrap();
        recv(&rx2).await;
        two.shutdown();
        assert_eq!(two.send(1, b"x".to_vec()), Err(SendError::ShutDown));
        assert!(
            recv_within(&rx2, PATIENCE).await.is_none(),
            "channel did not end"
        );
        assert!(eventually(PATIENCE, || one.connected_peers().is_empty()).await);
    });
}

#[test]
fn start_refuses_an_inconsistent_config() {
    run_local(|| async {
        let addrs = [(1, free_addr()), (2, free_addr())];
        let mut wrong_handshake = config(1, &addrs);
        wrong_handshake.handshake.node_id = 2;
        assert!(Transport::start(wrong_handshake).is_err());
        let mut stranger_peer = config(1, &addrs);
        stranger_peer.peers.push((7, free_addr()));
        assert!(Transport::start(stranger_peer).is_err());
        let mut no_backoff = config(1, &addrs);
        no_backoff.reconnect_backoff_min = Duration::ZERO;
        assert!(Transport::start(no_backoff).is_err());
    });
}

#[test]
fn shard_i_listens_on_the_base_port_plus_i() {
    let base: SocketAddr = "10.0.0.1:7000".parse().unwrap();
    assert_eq!(shard_peer_addr(base, 0), base);
    assert_eq!(
        shard_peer_addr(base, 3),
        "10.0.0.1:7003".parse::<SocketAddr>().unwrap()
    );
}
