//! Topics shared with other processes through Redis pub/sub (`server.pubsub_redis(url)`).
//!
//! One task per server owns the link: a single RESP3 connection (one socket) carries the
//! `PUBLISH`es, the `SUBSCRIBE`s and, as pushes, the messages of the subscribed channels. A
//! process usually runs one server; one that runs several gets one link per server, because
//! each server has its own topics, namespace and stats, and sharing a link between them would
//! mean routing every message to several registries for a case that is rare.
//!
//! Sharded pub/sub on a Redis Cluster is the exception to one socket: a shard channel lives on
//! the master of its hash slot, and any other node answers `MOVED`. There the link is the
//! `redis` crate's cluster connection (one RESP3 connection per master, routed by slot, `MOVED`
//! followed by refreshing its slot map). A slot given to another master takes its
//! subscriptions with it only through the link: the old master ends them with a push, which
//! the crate takes as final, and the link subscribes again. Whether the URL's node is in a
//! cluster is asked on each connection (`INFO cluster`), so a standalone Redis 7 keeps the one
//! connection. The URL names one node, which may be the one that died (its replica promoted in
//! its place): each cluster connection notes the nodes `CLUSTER SLOTS` lists, and when the URL's
//! node no longer answers, the link reconnects through those. A master the link has no
//! connection to yet (one restarted) gets one command alone first, and the link counts as up
//! only once the masters say (`CLIENT INFO`) they hold every channel it subscribed: the crate
//! opens a connection per command that finds none, keeps one and closes the others with their
//! subscriptions, without a word.
//!
//! - Publishes arrive from `Shared::publish` on a queue bounded in count and in bytes
//!   (`pubsub/remote.rs`), which never makes the loop thread wait, and hold their bytes until
//!   Redis has answered the pipeline that carried them; they go to Redis in pipelines, in the
//!   order they came, each framed with this process's origin id and its sequence number.
//! - A channel is subscribed only while the topic has local subscribers: `Conn` reports a
//!   topic's first subscriber and its last leaving (into a set of changed topics, recorded only
//!   while the link is up: a new connection reads the whole registry), and the task checks the
//!   registry itself before it subscribes or unsubscribes, so reports that race each other
//!   cannot leave it subscribed in vain or deaf.
//! - Messages from Redis go to the local subscribers through `Shared::publish_local`. They
//!   wait for it in a queue bounded in bytes (`INCOMING_BYTES`): Redis sends at the rate other
//!   processes publish, and the fan-out may be slower. The crate's connection task reads every
//!   push into it as it comes, so that the fan-out and the reading run on both threads at once
//!   (read in line with the fan-out, a flood this process kept up with got the link cut by
//!   Redis instead); a message that does not fit is dropped, counted and logged. A message
//!   of this process's own origin is dropped (its subscribers here had it already),
//!   and so is one whose sequence number is not past the last one seen from its origin (on a
//!   cluster, from its origin in that hash slot: one origin's slots are published to, and
//!   arrive, on separate connections, in order only slot by slot).
//! - A channel Redis refuses alone (`NOPERM`: an ACL user not allowed it) is left out, not the
//!   link: each command of a pipeline has its own reply, so that topic stays unsubscribed and
//!   its publishes are counted lost, with one log line per channel, while the others go on.
//! - When the link drops, local delivery goes on; publishes are counted lost until the task
//!   has reconnected (with backoff) and resubscribed. Redis pub/sub is at-most-once: nothing
//!   is replayed. One log line says the link is down (one more for each new refusal Redis
//!   answers the reconnections with), one that it is back. On a cluster, losing
//!   any node's connection drops the whole link, although the crate would repair that node
//!   alone: what it publishes and receives meanwhile would otherwise be lost without a count
//!   or a log line.

mod patience;

use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::try_join_all;
use redis::aio::{AsyncPushSender, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, Slot,
    SlotAddr,
};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline,
    ProtocolVersion, PushInfo, PushKind, RedisError, RedisResult, Value,
};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::engine::bridge::events::LogKind;
use crate::engine::config::RedisConfig;
use crate::engine::pubsub::remote::{self, ByteBound, Outgoing, RemoteInbox};
use crate::engine::stats::Counter;
use crate::engine::ws::encode::OutFrame;
use crate::engine::ws::shared::Shared;
use patience::{patiently, slot_of, timeout_for, Arrivals, PIPELINE_BYTES, SLOTS, TIMEOUT};

/// Reconnection waits double from the first to the last: after Redis comes back, the link is
/// back within `MAX_BACKOFF` plus a connect and a resubscribe.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The cluster crate's own response timeout, under `patiently`'s, which decides: it bounds the
/// requests the crate makes for itself (a new connection's PING, a refresh of its slot map
/// after a `MOVED`), which hold ours while they last and which `patiently` cannot see; and any
/// one request, extensions included. Past it, Redis's default limit on a subscriber's output
/// buffer (32 MB) has cut any subscriber slower than about half a MB a second.
const CRATE_TIMEOUT: Duration = Duration::from_secs(60);
/// A cluster connection's first, to the URL's node and then to each master, each a connect and
/// a PING.
const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(8);
/// Pinged this often (`keep_pinging`), so that a Redis gone without closing the socket (a
/// machine gone) is noticed within `PING_EVERY` + `TIMEOUT` even when nothing is published,
/// and whatever else the link waits for.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Publishes (or topic changes) written to Redis in one pipeline.
const BATCH: usize = 1024;
/// How long a stopped server's link may take to send the last publishes of its connections.
const LAST_PUBLISHES: Duration = Duration::from_secs(2);
/// Origins (on a cluster, origins in a slot) remembered for duplicate checks; each restarted
/// process is a new one, so the map is emptied when it grows past this rather than growing for
/// ever.
const MAX_SEQUENCES: usize = 64 * 1024;
/// Messages read from Redis and not yet fanned out, in bytes (channel names and payloads):
/// as much as may wait to go to Redis (`pubsub::remote`).
const INCOMING_BYTES: usize = 64 << 20;
/// What a message push holds beside its bytes: the push and its two values, and the allocator's
/// headers of the three allocations. Counted so that a flood of tiny messages is bounded too.
const PUSH_OVERHEAD: usize =
    std::mem::size_of::<PushInfo>() + 2 * std::mem::size_of::<Value>() + 3 * 16;
/// Channels Redis refused (`Link::refused`) remembered so that each is logged once; a process
/// refused more (topics named by its clients) logs them again rather than holding every name.
const MAX_REFUSED: usize = 1024;
/// What a log line quotes of an error, in bytes: Redis's code and words fit (`WRONGPASS invalid
/// username-password pair or user is disabled.` is 61), a crate error's chain of causes is cut.
const MAX_WHY: usize = 160;

/// Run the link of `shared` until the server stops.
pub(crate) async fn run(shared: Arc<Shared>, config: RedisConfig, mut inbox: RemoteInbox) {
    // Checked by `Server::start`: an error here cannot happen, and would leave topics local.
    let Ok((client, info, peer)) = client(&config) else {
        return;
    };
    let mut link = Link {
        shared,
        peer: peer.clone(),
        channel_prefix: config.namespace,
        sharded: config.sharded,
        subscribed: HashSet::default(),
        last_seq: FxHashMap::default(),
        cluster: false,
        nodes: Vec::new(),
        masters: Masters::default(),
        refused: HashSet::default(),
        seq: 0,
        arrived: Arrivals::new(false),
    };
    // Not the stop's start: the link carries what the server's connections publish while they
    // close (an `on_close` saying a user left), and ends once they all have (`Server::stop`).
    let shutdown = link.shared.links_end.clone();
    let mut backoff = MIN_BACKOFF;
    let mut down = false;
    // Redis's code in the last line that said the link is down (`Down::code`).
    let mut logged_code = None;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return link.lose_queued(&mut inbox, true),
            connected = link.connect(&client, &info) => connected,
        };
        let reason = match connected {
            Ok((mut conn, mut pushes)) => {
                link.remote().set_connected(true);
                if down {
                    link.shared.log(LogKind::RedisUp, &peer, 0, "resubscribed");
                    down = false;
                }
                backoff = MIN_BACKOFF;
                // Not raced against the end: `serve` ends at it between two pipelines, with what
                // is queued sent, where dropping it would lose a pipeline on its way.
                let reason = link.serve(&mut conn, &mut pushes, &mut inbox).await;
                link.remote().set_connected(false);
                if shutdown.is_cancelled() {
                    // Whatever ended `serve` (the end, or Redis failing during the last
                    // publishes), nothing queued is left uncounted.
                    return link.lose_queued(&mut inbox, true);
                }
                link.fan_out_left(&mut pushes);
                link.subscribed.clear();
                reason
            }
            Err(reason) => reason,
        };
        // The next connection subscribes to what the registry holds then.
        link.remote().stop_tracking();
        // One line per outage; and one more each time Redis answers with a new refusal: Redis
        // back with another password said only "connection lost" until the link was up once.
        // The transport's reasons (refused, timed out, lost) change as a Redis restarts, and so
        // do Redis's passing states (`LOADING`, `CLUSTERDOWN`, ...): not repeated.
        let refused = reason.code.as_deref().is_some_and(refusal_code);
        if !down || (refused && reason.code != logged_code) {
            logged_code = reason.code;
            link.shared.log(LogKind::RedisDown, &peer, 0, reason.line);
            down = true;
        }
        // Queued before the link dropped: never sent, and too old to send after the outage.
        link.lose_queued(&mut inbox, false);
        tokio::select! {
            _ = shutdown.cancelled() => return link.lose_queued(&mut inbox, true),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The client for `config`'s URL, always on RESP3 (its pushes are what lets one connection
/// both publish and subscribe), what a cluster client is made of, and the server's address for
/// log lines (never the password).
fn client(config: &RedisConfig) -> RedisResult<(Client, ConnectionInfo, String)> {
    let info = config.url.as_str().into_connection_info()?;
    let peer = info.addr().to_string();
    // Pub/sub ignores the db, and a cluster refuses `SELECT` (a standalone Redis, a db past
    // its count): with the URL's db kept, `/1` never connected to a cluster.
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3)
        .set_db(0);
    let info = info.set_redis_settings(settings);
    Ok((Client::open(info.clone())?, info, peer))
}

/// Whether Redis's error `code` refuses this link (its credentials or its rights), which no
/// retry mends, as opposed to a state Redis passes through.
fn refusal_code(code: &str) -> bool {
    matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
}

/// Why the link is down.
struct Down {
    /// For its log line (`why`).
    line: Cow<'static, str>,
    /// Redis's error code when the reason is Redis's answer (a refusal such as `WRONGPASS`),
    /// not the transport's.
    code: Option<String>,
}

impl From<&'static str> for Down {
    fn from(line: &'static str) -> Self {
        Down {
            line: line.into(),
            code: None,
        }
    }
}

/// Why the link is down, for its log line: `context`, then the error's code (`WRONGPASS`,
/// `NOAUTH`, `NOPERM`, ...) and what Redis said, or the client's own words for a failure that
/// is not Redis's answer, at most `MAX_WHY` bytes of them. Redis never repeats a password in
/// an error, and the crate's errors do not hold the URL: the line carries no secret.
fn why(context: &str, e: &RedisError) -> Down {
    let (code, said) = said(e);
    Down {
        line: format!("{context}: {}", cut(&said)).into(),
        code,
    }
}

/// `why` for a connection that could not be made. A Redis without TLS answers a TLS handshake
/// with nothing (it waits for the end of a line) or with bytes that are not TLS: "timed out"
/// alone did not say that a `rediss://` URL may name a port without TLS.
fn cannot_connect(info: &ConnectionInfo, e: &RedisError) -> Down {
    let mut down = why("cannot connect", e);
    let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    let unanswered = e.is_timeout() || (e.is_io_error() && !e.is_connection_refusal());
    if tls && down.code.is_none() && unanswered {
        down.line = format!("{}; is that port Redis's TLS port?", down.line).into();
    }
    down
}

/// What Redis said: the error's code, and its code and words; or no code and the client's own
/// words for a failure that is not Redis's answer.
fn said(e: &RedisError) -> (Option<String>, String) {
    // A pipeline's error has the code of its first failed command but not its words.
    let first = e.clone().into_server_errors();
    let first = first.as_ref().and_then(|errors| errors.first());
    match (e.code(), e.detail(), first) {
        (Some(code), Some(detail), _) => (Some(code.to_owned()), format!("{code} {detail}")),
        (_, _, Some((_, error))) => {
            let code = error.code().to_owned();
            match error.details() {
                Some(detail) => (Some(code.clone()), format!("{code} {detail}")),
                None => (Some(code.clone()), code),
            }
        }
        (code, _, None) => (code.map(str::to_owned), e.to_string()),
    }
}

/// `text`, cut to `MAX_WHY` bytes, with "..." when it was.
fn cut(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_WHY {
        return Cow::Borrowed(text);
    }
    let mut end = MAX_WHY;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}...", &text[..end]))
}

/// Whether Redis refused a command for its channel alone (an ACL that does not allow it), not
/// for anything that would fail the other channels too.
fn refuses_channel(e: &RedisError) -> bool {
    e.code() == Some("NOPERM")
}

/// What one command's reply in a pipeline says: taken (`None`), its channel refused alone
/// (`Some`, `refuses_channel`), or an error that fails the link.
fn refusal(reply: Value) -> RedisResult<Option<RedisError>> {
    match reply {
        Value::ServerError(e) => {
            let e = RedisError::from(e);
            if refuses_channel(&e) {
                Ok(Some(e))
            } else {
                Err(e)
            }
        }
        _ => Ok(None),
    }
}

/// Publishes taken off the queue for one round trip to Redis (`Link::prepare`): its
/// pipelines, the publishes and their bytes.
struct Batch {
    pipes: Vec<Pipe>,
    count: usize,
    size: usize,
}

/// Publishes to one hash slot (all of them, on a single node), with their topics in order.
struct Pipe {
    slot: Option<u16>,
    pipe: Pipeline,
    topics: Vec<Box<str>>,
}

/// The connection of a link.
#[derive(Clone)]
enum Conn {
    /// A standalone Redis; or any node of a cluster for plain pub/sub, whose `PUBLISH` reaches
    /// every node.
    Node(MultiplexedConnection),
    /// A cluster with sharded pub/sub.
    Cluster(ClusterConnection),
}

/// A PING's outcome: Redis answered, if only to refuse (an ACL user without `+ping`, which
/// `+@pubsub` does not grant, had its link dropped every 5 s), or not.
fn answered<T>(answer: RedisResult<T>) -> RedisResult<()> {
    match answer {
        Err(e) if e.code().is_none() => Err(e),
        _ => Ok(()),
    }
}

/// Ask whether the connection is alive every `PING_EVERY`, in a task of its own: a request the
/// link waits on (a publish behind a busy master's backlog, given time by `patiently`) held
/// off the PINGs, so a master gone silent meanwhile was noticed only once that request was
/// answered. On a cluster, each master on a clock of its own, each of which may hold
/// subscriptions and may stop answering while the others go on: one round for all waited for
/// the busiest. `failures` gets the first PING not answered; the task ends with the handle.
fn keep_pinging(
    conn: &Conn,
    masters: &Masters,
    arrived: &Arc<Arrivals>,
    failures: mpsc::Sender<RedisError>,
) -> AbortOnDropHandle<()> {
    let targets: Vec<_> = match conn {
        Conn::Cluster(_) if !masters.first_slot.is_empty() => masters
            .first_slot
            .iter()
            .copied()
            .enumerate()
            .map(Some)
            .collect(),
        _ => vec![None],
    };
    let clocks = targets
        .into_iter()
        .map(|target| keep_asking(conn.clone(), target, arrived.clone()));
    let clocks = try_join_all(clocks);
    AbortOnDropHandle::new(tokio::spawn(async move {
        if let Err(e) = clocks.await {
            let _ = failures.try_send(e);
        }
    }))
}

/// `ping` every `PING_EVERY` until one is not answered.
async fn keep_asking(
    mut conn: Conn,
    master: Option<(usize, u16)>,
    arrived: Arc<Arrivals>,
) -> RedisResult<()> {
    let mut every = tokio::time::interval(PING_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.reset();
    loop {
        every.tick().await;
        ping(&mut conn, master, &arrived).await?;
    }
}

/// One PING, of `master` (a cluster's, by its number and its first slot, which routes it), of
/// every master when they are not known, or of the single node; waited on for as long as the
/// connection it goes on brings pushes. (A pipeline without a key goes to one node at random: a
/// master gone silent was noticed only once a PING happened to pick it.)
async fn ping(
    conn: &mut Conn,
    master: Option<(usize, u16)>,
    arrived: &Arrivals,
) -> RedisResult<()> {
    let (conn, seen) = match (conn, master) {
        (Conn::Node(conn), _) => {
            let ping = redis::cmd("PING");
            let answer = patiently(|| arrived.seen(None), TIMEOUT, ping.exec_async(conn)).await;
            return answered(answer);
        }
        (Conn::Cluster(conn), None) => {
            let masters = RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::AllSucceeded),
            ));
            (conn.route_command(redis::cmd("PING"), masters), None)
        }
        (Conn::Cluster(conn), Some((master, slot))) => {
            let route = Route::new(slot, SlotAddr::Master);
            let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
            (conn.route_command(redis::cmd("PING"), to), Some(master))
        }
    };
    answered(patiently(|| arrived.seen(seen), TIMEOUT, conn).await)
}

/// `request`'s outcome, unless a PING goes unanswered first (`keep_pinging`): then the error
/// of that PING, and `request` is dropped.
async fn unless<T>(
    failed: &mut mpsc::Receiver<RedisError>,
    request: impl Future<Output = T>,
) -> Result<T, RedisError> {
    tokio::select! {
        answer = request => Ok(answer),
        Some(e) = failed.recv() => Err(e),
    }
}

/// Whether `conn`'s node is part of a Redis Cluster. A Redis that refuses `INFO` (some hosted
/// ones rename it) is taken for a single node: were it a cluster after all, a channel of
/// another node would get `MOVED`, which fails the link, and the next connection asks again.
async fn in_cluster(conn: &mut MultiplexedConnection) -> RedisResult<bool> {
    match redis::cmd("INFO")
        .arg("cluster")
        .query_async::<String>(conn)
        .await
    {
        Ok(info) => Ok(info.lines().any(|line| line.trim() == "cluster_enabled:1")),
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_unrecoverable_error() => Err(e),
        Err(_) => Ok(false),
    }
}

/// The ranges of `CLUSTER SLOTS`: each its first and last slot, then its master and replicas.
async fn cluster_slots(conn: &mut ClusterConnection) -> RedisResult<Vec<Value>> {
    redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await
}

/// The masters of a cluster, each as a number of its own (its place in a `CLUSTER SLOTS`
/// answer's order), only to tell them apart.
#[derive(Default)]
struct Masters {
    /// The master of each slot, by the slot's number (empty: not known).
    of_slot: Vec<Option<usize>>,
    /// Each master's first slot, which its PING is routed by.
    first_slot: Vec<u16>,
}

impl Masters {
    /// The master of `channel`'s slot, if known.
    fn of(&self, channel: &str) -> Option<usize> {
        let slot = usize::from(slot_of(channel.as_bytes()));
        self.of_slot.get(slot).copied().flatten()
    }
}

/// The master of each slot a `CLUSTER SLOTS` answer lists: the first node of its range.
fn masters(ranges: &[Value]) -> Masters {
    let mut masters = FxHashMap::default();
    let (mut of_slot, mut first_slot) = (Vec::new(), Vec::new());
    for range in ranges {
        let Value::Array(range) = range else { continue };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (range.first(), range.get(1), range.get(2))
        else {
            continue;
        };
        let (Some(Value::BulkString(host)), Some(Value::Int(port))) =
            (master.first(), master.get(1))
        else {
            continue;
        };
        let (Ok(first), Ok(last)) = (u16::try_from(*first), u16::try_from(*last)) else {
            continue;
        };
        if usize::from(last) >= SLOTS || first > last {
            continue;
        }
        let count = masters.len();
        let master = *masters.entry((host.as_slice(), *port)).or_insert(count);
        if master == first_slot.len() {
            first_slot.push(first);
        }
        of_slot.resize(SLOTS, None);
        of_slot[usize::from(first)..=usize::from(last)].fill(Some(master));
    }
    Masters {
        of_slot,
        first_slot,
    }
}

/// The shard channels that the link's connections to the masters hold, by `CLIENT INFO` on each
/// (its `ssub=`): a master the link has no connection to counts none. `None` when a master will
/// not say (an ACL without `CLIENT`, a Redis without the field): then nothing is checked.
async fn shard_subscriptions(conn: &mut ClusterConnection) -> RedisResult<Option<usize>> {
    let masters = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    let mut info = redis::cmd("CLIENT");
    info.arg("INFO");
    let Value::Map(answers) = conn.route_command(info, masters).await? else {
        return Ok(None);
    };
    let mut held = 0;
    for (_, answer) in answers {
        let text = match answer {
            Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Value::VerbatimString { text, .. } => text,
            Value::SimpleString(text) => text,
            _ => return Ok(None),
        };
        let count = text
            .split_whitespace()
            .find_map(|field| field.strip_prefix("ssub="))
            .and_then(|count| count.parse::<usize>().ok());
        let Some(count) = count else { return Ok(None) };
        held += count;
    }
    Ok(Some(held))
}

/// The nodes of a `CLUSTER SLOTS` answer, each once. One listed without an address is left
/// out: "" stands for the node that answered, which the crate does not say, and "?" for one
/// not known yet.
fn listed_nodes(ranges: &[Value], info: &ConnectionInfo) -> Vec<ConnectionInfo> {
    let mut seen = FxHashSet::default();
    let mut nodes = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else { continue };
        // The first two are the range's first and last slot.
        for node in range.iter().skip(2) {
            let Value::Array(node) = node else { continue };
            let (Some(Value::BulkString(host)), Some(Value::Int(port))) =
                (node.first(), node.get(1))
            else {
                continue;
            };
            let (Ok(host), Ok(port)) = (std::str::from_utf8(host), u16::try_from(*port)) else {
                continue;
            };
            if host.is_empty() || host == "?" || !seen.insert((host.to_owned(), port)) {
                continue;
            }
            let addr = match info.addr() {
                ConnectionAddr::TcpTls {
                    insecure,
                    tls_params,
                    ..
                } => ConnectionAddr::TcpTls {
                    host: host.to_owned(),
                    port,
                    insecure: *insecure,
                    tls_params: tls_params.clone(),
                },
                _ => ConnectionAddr::Tcp(host.to_owned(), port),
            };
            nodes.push(info.clone().set_addr(addr));
        }
    }
    nodes
}

struct Link {
    shared: Arc<Shared>,
    /// Redis's address, for log lines.
    peer: String,
    channel_prefix: String,
    sharded: bool,
    /// Topics subscribed on the current connection.
    subscribed: HashSet<Arc<str>>,
    /// The last sequence number delivered from each other process (and slot, on a cluster).
    last_seq: FxHashMap<(u64, Option<Slot>), u64>,
    /// Connected to a cluster, with sharded pub/sub.
    cluster: bool,
    /// The cluster's nodes, masters and replicas, as the last cluster connection listed them.
    nodes: Vec<ConnectionInfo>,
    /// The masters, as the last cluster connection listed them.
    masters: Masters,
    /// The topics whose channels Redis refused (`NOPERM`) and has not taken since: each is
    /// logged when it enters. Kept across reconnections, in which the refusal comes again.
    refused: HashSet<Box<str>>,
    /// This process's sequence number: kept across reconnections, so that receivers see it
    /// only grow.
    seq: u64,
    /// Pushes the current connection has brought (`patience`).
    arrived: Arc<Arrivals>,
}

impl Link {
    /// What the current connection to `master` (to any master: `None`; a single node's one
    /// connection either way) has brought, for `patiently`.
    fn seen(&self, master: Option<usize>) -> impl Fn() -> u64 + Copy + '_ {
        move || self.arrived.seen(master)
    }

    /// The masters of a `CLUSTER SLOTS` answer, for the link and for what its pushes count for.
    fn use_masters(&mut self, masters: Masters) {
        for (slot, master) in masters.of_slot.iter().enumerate() {
            if let (Some(master), Ok(slot)) = (master, u16::try_from(slot)) {
                self.arrived.set_master(slot, *master);
            }
        }
        self.masters = masters;
    }

    fn remote(&self) -> &remote::Remote {
        self.shared
            .remote
            .as_ref()
            .expect("the broker runs only for a server with a Remote")
    }

    fn channel(&self, topic: &str) -> String {
        format!("{}{topic}", self.channel_prefix)
    }

    /// Redis refused `topic`'s channel, for it alone (`refuses_channel`): the link goes on
    /// without it, and says so the first time.
    fn refuse(&mut self, topic: &str, e: &RedisError) {
        if self.refused.len() >= MAX_REFUSED && !self.refused.contains(topic) {
            self.refused.clear();
        }
        if self.refused.insert(topic.into()) {
            let channel = self.channel(topic);
            let line = format!("{} ({})", cut(&channel), cut(&said(e).1));
            self.shared.log(LogKind::RedisRefused, &self.peer, 0, line);
        }
    }

    /// Redis took `topic`'s channel: a later refusal is news again.
    fn taken(&mut self, topic: &str) {
        if !self.refused.is_empty() {
            self.refused.remove(topic);
        }
    }

    /// Connect and subscribe to every topic with local subscribers.
    async fn connect(
        &mut self,
        client: &Client,
        info: &ConnectionInfo,
    ) -> Result<(Conn, Pushes), Down> {
        self.arrived = Arrivals::new(false);
        let (push_tx, pushes) = push_queue(&self.shared, self.arrived.clone());
        // No timeout of the crate's: each request's is `patiently`'s, which waits on while
        // Redis sends pushes on the same connection.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(None)
            .set_push_sender(push_tx);
        let seeds = match client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(mut node) => {
                let cluster = self.sharded
                    && patiently(self.seen(None), TIMEOUT, in_cluster(&mut node))
                        .await
                        .map_err(|e| why("cannot connect", &e))?;
                if !cluster {
                    return self.subscribe_all(Conn::Node(node), pushes).await;
                }
                // The node's own connection goes, and with it its pushes: its `Disconnection` as
                // it closes is not the link's.
                vec![info.clone()]
            }
            // The URL's node may be gone for good (a master whose replica took its place is not
            // restarted), while the rest of the cluster is up: the URL was only a way in.
            Err(_) if self.cluster && !self.nodes.is_empty() => self.nodes.clone(),
            Err(e) => return Err(cannot_connect(info, &e)),
        };
        self.arrived = Arrivals::new(true);
        // The masters known before, for this connection's pushes until its own are read.
        let known = std::mem::take(&mut self.masters);
        self.use_masters(known);
        let (push_tx, pushes) = push_queue(&self.shared, self.arrived.clone());
        let client = ClusterClientBuilder::new(seeds)
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(push_tx)
            .connection_timeout(TIMEOUT)
            .response_timeout(CRATE_TIMEOUT)
            .build()
            .map_err(|e| why("cannot connect", &e))?;
        let connecting =
            tokio::time::timeout(CLUSTER_CONNECT_TIMEOUT, client.get_async_connection());
        let mut conn = match connecting.await {
            Ok(connected) => connected.map_err(|e| cannot_connect(info, &e))?,
            Err(_) => {
                return Err(cannot_connect(
                    info,
                    &io::Error::from(io::ErrorKind::TimedOut).into(),
                ))
            }
        };
        // On no answer, the nodes found before still serve: a cluster's nodes change a few at a
        // time, so most of an older list still leads in.
        if let Ok(ranges) = patiently(self.seen(None), TIMEOUT, cluster_slots(&mut conn)).await {
            let nodes = listed_nodes(&ranges, info);
            if !nodes.is_empty() {
                self.nodes = nodes;
                self.use_masters(masters(&ranges));
            }
        }
        self.subscribe_all(Conn::Cluster(conn), pushes).await
    }

    /// Subscribe `conn` to every topic with local subscribers.
    async fn subscribe_all(
        &mut self,
        mut conn: Conn,
        pushes: Pushes,
    ) -> Result<(Conn, Pushes), Down> {
        let cluster = matches!(conn, Conn::Cluster(_));
        if self.cluster != cluster {
            // Sequences are kept by slot on a cluster, by origin alone elsewhere.
            self.last_seq.clear();
            self.cluster = cluster;
        }
        // What a connection that failed while subscribing had, its successor has not.
        self.subscribed.clear();
        self.remote().track_changes();
        let topics = self.shared.topics.names();
        for chunk in topics.chunks(BATCH) {
            self.change_subscriptions(&mut conn, chunk, &[])
                .await
                .map_err(|e| why("cannot subscribe", &e))?;
        }
        // Each `SSUBSCRIBE` answered is not each channel held: one that went to a master the
        // link had no connection to yet may have opened one of its own, which the crate then
        // replaced, closing it with its subscriptions, without an error or a push. Asked of the
        // masters themselves, a shortfall is an outage, retried, not a deaf topic for good.
        if let Conn::Cluster(cluster) = &mut conn {
            let held = patiently(self.seen(None), TIMEOUT, shard_subscriptions(cluster))
                .await
                .map_err(|e| why("cannot subscribe", &e))?;
            let wanted = self.subscribed.len();
            if let Some(held) = held.filter(|&held| held != wanted) {
                return Err(Down {
                    line: format!("cannot subscribe: the masters hold {held} of {wanted} channels")
                        .into(),
                    code: None,
                });
            }
        }
        Ok((conn, pushes))
    }

    /// Serve the connection until it fails; returns why.
    async fn serve(
        &mut self,
        conn: &mut Conn,
        pushes: &mut Pushes,
        inbox: &mut RemoteInbox,
    ) -> Down {
        let mut outgoing = Vec::with_capacity(BATCH);
        let mut ended = Vec::new();
        let shared = self.shared.clone();
        let remote = shared
            .remote
            .as_ref()
            .expect("the broker runs only for a server with a Remote");
        // The PINGs' failures, from the task of the map of masters in use (started again when
        // the map is read again): kept open here, so that it never reads as ended.
        let (failures, mut failed) = mpsc::channel(1);
        let mut _pinging = keep_pinging(conn, &self.masters, &self.arrived, failures.clone());
        loop {
            tokio::select! {
                push = pushes.receiver.recv() => match push {
                    Some(push) => {
                        if !self.on_push(push, &pushes.backlog, &mut ended) {
                            return "connection lost".into();
                        }
                        if !ended.is_empty() {
                            let moved = self.read_masters_if_moved(conn, &ended);
                            match unless(&mut failed, moved).await {
                                Ok(false) => {}
                                Ok(true) => {
                                    _pinging = keep_pinging(
                                        conn,
                                        &self.masters,
                                        &self.arrived,
                                        failures.clone(),
                                    );
                                }
                                Err(e) => return why("no answer to PING", &e),
                            }
                            match unless(&mut failed, self.reconcile(conn, &mut ended)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => return why("subscribe failed", &e),
                                Err(e) => return why("no answer to PING", &e),
                            }
                        }
                    }
                    None => return "connection lost".into(),
                },
                n = inbox.outgoing.recv_many(&mut outgoing, BATCH) => {
                    if n == 0 {
                        // The server (and its `Remote`) is gone.
                        return "server dropped".into();
                    }
                    while !outgoing.is_empty() {
                        if shared.links_end.is_cancelled() {
                            // The rest goes with `publish_last`, within its bound, not each
                            // pipeline within its own (and is counted, whatever happens).
                            self.publish_last(conn, inbox, &mut outgoing).await;
                            return "server stopped".into();
                        }
                        let batch = self.prepare(conn, &mut outgoing);
                        let down = match unless(&mut failed, self.send(conn, &batch)).await {
                            Ok(replies) => self
                                .settle(batch, replies)
                                .err()
                                .map(|e| why("publish failed", &e)),
                            Err(e) => {
                                // None of it counts as published: its answer never came.
                                let _ = self.settle(batch, Err(e.clone()));
                                Some(why("no answer to PING", &e))
                            }
                        };
                        if let Some(down) = down {
                            self.lose(&mut outgoing);
                            return down;
                        }
                    }
                }
                _ = remote.changed() => {
                    let mut topics = remote.take_changes(BATCH);
                    match unless(&mut failed, self.reconcile(conn, &mut topics)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return why("subscribe failed", &e),
                        Err(e) => return why("no answer to PING", &e),
                    }
                }
                Some(e) = failed.recv() => return why("no answer to PING", &e),
                _ = shared.links_end.cancelled() => {
                    self.publish_last(conn, inbox, &mut outgoing).await;
                    return "server stopped".into();
                }
            }
        }
    }

    /// The server has stopped and its connections have all ended: send what they published
    /// that is still queued, within `LAST_PUBLISHES` (a Redis that does not answer must not
    /// hold the stop), and count what is not sent as lost.
    async fn publish_last(
        &mut self,
        conn: &mut Conn,
        inbox: &mut RemoteInbox,
        outgoing: &mut Vec<Outgoing>,
    ) {
        // A publish from here on (the application's own, after its stop) is refused as lost,
        // not queued where nothing would take it: one that found the link up just before is
        // refused by the closed queue, or is in it, and taken below.
        self.remote().set_connected(false);
        inbox.outgoing.close();
        while let Ok(out) = inbox.outgoing.try_recv() {
            outgoing.push(out);
        }
        let deadline = tokio::time::Instant::now() + LAST_PUBLISHES;
        while !outgoing.is_empty() {
            let batch = self.prepare(conn, outgoing);
            let replies = tokio::time::timeout_at(deadline, self.send(conn, &batch))
                .await
                .unwrap_or_else(|_| {
                    Err(
                        io::Error::new(io::ErrorKind::TimedOut, "no answer as the server stopped")
                            .into(),
                    )
                });
            if self.settle(batch, replies).is_err() {
                self.lose(outgoing);
            }
        }
    }

    /// Read the masters again (`CLUSTER SLOTS`) when a master has ended subscriptions that
    /// are still wanted here, which it does when it gives their slot away: what the new master
    /// brings would count for the old one, whose requests it would keep waiting, and the new
    /// one's would get no more than `TIMEOUT`. (The confirmations of the link's own
    /// `SUNSUBSCRIBE`s end topics no one wants.) Asked of the master that gave the slot away,
    /// which knows the new one before it ends the slot's subscriptions, where another master may
    /// not have been told yet. On no answer, the map known before serves. Whether the masters'
    /// numbers or first slots changed, which the PING task must start again for: not at each
    /// move, so that a resharding's many moves do not keep resetting its clocks.
    async fn read_masters_if_moved(&mut self, conn: &mut Conn, ended: &[Arc<str>]) -> bool {
        let Conn::Cluster(conn) = conn else {
            return false;
        };
        let topics = &self.shared.topics;
        let Some(moved) = ended
            .iter()
            .find(|topic| topics.subscriber_count(topic) > 0)
        else {
            return false;
        };
        let route = Route::new(slot_of(self.channel(moved).as_bytes()), SlotAddr::Master);
        let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        let ask = conn.route_command(redis::cmd("CLUSTER").arg("SLOTS").clone(), to);
        let Ok(Value::Array(ranges)) = patiently(self.seen(None), TIMEOUT, ask).await else {
            return false;
        };
        let masters = masters(&ranges);
        if masters.first_slot.is_empty() {
            return false;
        }
        let renumbered = masters.first_slot != self.masters.first_slot;
        self.use_masters(masters);
        renumbered
    }

    /// Take the first `PIPELINE_BYTES` of `batch` (at least one publish) off it, to go to Redis
    /// (`send`) in order, in one pipeline; on a cluster, in one pipeline per hash slot (the
    /// crate refuses a pipeline across slots), all at once, each in order: a topic's publishes
    /// stay in order, and those of topics on different masters never had an order a subscriber
    /// could see. What Redis answers is counted by `settle`.
    fn prepare(&mut self, conn: &Conn, batch: &mut Vec<Outgoing>) -> Batch {
        let command = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        let origin = self.remote().origin;
        let (mut end, mut size) = (0, 0);
        for out in batch.iter() {
            if end > 0 && size + out.size() > PIPELINE_BYTES {
                break;
            }
            end += 1;
            size += out.size();
        }
        // Each pipeline with its publishes' topics, in its order: each command's reply is its own.
        let mut pipes: FxHashMap<Option<u16>, Pipe> = FxHashMap::default();
        for out in batch.drain(..end) {
            self.seq += 1;
            let message = remote::encode(origin, self.seq, out.opcode, &out.payload);
            let channel = self.channel(&out.topic);
            let slot = matches!(conn, Conn::Cluster(_)).then(|| slot_of(channel.as_bytes()));
            let Pipe { pipe, topics, .. } = pipes.entry(slot).or_insert_with(|| {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                Pipe {
                    slot,
                    pipe,
                    topics: Vec::new(),
                }
            });
            pipe.cmd(command).arg(channel).arg(message.as_ref());
            topics.push(out.topic);
        }
        Batch {
            pipes: pipes.into_values().collect(),
            count: end,
            size,
        }
    }

    /// Send `batch`'s pipelines; their replies, in their order.
    async fn send(&self, conn: &mut Conn, batch: &Batch) -> RedisResult<Vec<Vec<Value>>> {
        let size = batch.size;
        match conn {
            // A publish over `PIPELINE_BYTES` alone is given the time its bytes take too; a
            // cluster's pipelines, which go at once, each the time of them all.
            Conn::Node(conn) => match batch.pipes.first() {
                Some(Pipe { pipe, .. }) => {
                    let replies = pipe.query_async(conn);
                    let replies = patiently(self.seen(None), timeout_for(size), replies).await;
                    replies.map(|replies| vec![replies])
                }
                None => Ok(Vec::new()),
            },
            Conn::Cluster(conn) => {
                let each = batch.pipes.iter().map(|Pipe { slot, pipe, .. }| {
                    let mut conn = conn.clone();
                    let master = slot.and_then(|slot| {
                        self.masters
                            .of_slot
                            .get(usize::from(slot))
                            .copied()
                            .flatten()
                    });
                    let seen = self.seen(master);
                    async move {
                        let replies = pipe.query_async(&mut conn);
                        patiently(seen, timeout_for(size), replies).await
                    }
                });
                try_join_all(each).await
            }
        }
    }

    /// Account for `batch` once Redis answered it, or did not (`Err`). A publish whose channel
    /// Redis refused is lost alone (`refuse`). On any other error none of it counts as
    /// published: some may have reached Redis, but nothing here can tell which.
    fn settle(&mut self, batch: Batch, replies: RedisResult<Vec<Vec<Value>>>) -> RedisResult<()> {
        let Batch {
            pipes,
            count: end,
            size,
        } = batch;
        // Held until Redis answered: the pipeline's copies of the payloads live until then.
        self.remote().release(size);
        let answered = replies.and_then(|replies| {
            let mut refused = Vec::new();
            for (Pipe { topics, .. }, replies) in pipes.into_iter().zip(replies) {
                for (topic, reply) in topics.into_iter().zip(replies) {
                    match refusal(reply)? {
                        Some(e) => refused.push((topic, e)),
                        None => self.taken(&topic),
                    }
                }
            }
            Ok(refused)
        });
        let lost = match &answered {
            Ok(refused) => refused.len(),
            Err(_) => end,
        };
        let stats = &self.shared.stats;
        stats.add_all([
            (Counter::RedisPublished, (end - lost) as u64),
            (Counter::RedisPublishesLost, lost as u64),
        ]);
        for (topic, e) in answered? {
            self.refuse(&topic, &e);
        }
        Ok(())
    }

    /// Count what is queued for Redis as lost and release it: the link dropped, or the server
    /// stopped (`closed`: nothing is queued after it either).
    fn lose_queued(&self, inbox: &mut RemoteInbox, closed: bool) {
        if closed {
            inbox.outgoing.close();
        }
        let (mut lost, mut size) = (0, 0);
        while let Ok(out) = inbox.outgoing.try_recv() {
            lost += 1;
            size += out.size();
        }
        self.remote().release(size);
        self.shared.stats.add(Counter::RedisPublishesLost, lost);
    }

    /// Count `batch` lost and release what it holds: taken off the queue for pipelines that
    /// came after one that failed.
    fn lose(&self, batch: &mut Vec<Outgoing>) {
        let size = batch.iter().map(Outgoing::size).sum();
        self.remote().release(size);
        let lost = batch.len() as u64;
        batch.clear();
        self.shared.stats.add(Counter::RedisPublishesLost, lost);
    }

    /// Subscribe to the topics of `changed` that have local subscribers and are not subscribed
    /// yet, and unsubscribe from those that have none and are. The registry decides, not the
    /// order the reports came in.
    async fn reconcile(&mut self, conn: &mut Conn, changed: &mut Vec<Arc<str>>) -> RedisResult<()> {
        let mut join = Vec::new();
        let mut leave = Vec::new();
        let mut seen = HashSet::new();
        for topic in changed.drain(..) {
            if !seen.insert(topic.clone()) {
                continue;
            }
            let wanted = self.shared.topics.subscriber_count(&topic) > 0;
            match (wanted, self.subscribed.contains(&topic)) {
                (true, false) => join.push(topic),
                (false, true) => leave.push(topic),
                _ => {}
            }
        }
        self.change_subscriptions(conn, &join, &leave).await
    }

    /// One command per channel, in one pipeline: a `SUBSCRIBE` of several channels gets one
    /// reply per channel, which the multiplexed connection would pair with later commands; and
    /// an `SSUBSCRIBE` may name only channels of one hash slot. On a cluster, one command per
    /// channel too, each routed by the crate to its slot's master: the masters all at once,
    /// and on each master one command alone before the others, all at once (`on_master`). A
    /// channel Redis refuses is left unsubscribed (`refuse`), the others go on: it is asked
    /// again when its topic next gets a first subscriber, or on the next connection.
    async fn change_subscriptions(
        &mut self,
        conn: &mut Conn,
        join: &[Arc<str>],
        leave: &[Arc<str>],
    ) -> RedisResult<()> {
        if join.is_empty() && leave.is_empty() {
            return Ok(());
        }
        let (subscribe, unsubscribe) = if self.sharded {
            ("SSUBSCRIBE", "SUNSUBSCRIBE")
        } else {
            ("SUBSCRIBE", "UNSUBSCRIBE")
        };
        let refused: Vec<(Arc<str>, RedisError)> = match conn {
            Conn::Node(conn) => {
                let mut pipe = redis::pipe();
                // The replies of the joins, each its own; the leaves' are left out.
                pipe.ignore_errors();
                for topic in join {
                    pipe.cmd(subscribe).arg(self.channel(topic));
                }
                for topic in leave {
                    pipe.cmd(unsubscribe).arg(self.channel(topic)).ignore();
                }
                let replies: Vec<Value> =
                    patiently(self.seen(None), TIMEOUT, pipe.query_async(conn)).await?;
                let mut refused = Vec::new();
                for (topic, reply) in join.iter().zip(replies) {
                    if let Some(e) = refusal(reply)? {
                        refused.push((topic.clone(), e));
                    }
                }
                refused
            }
            Conn::Cluster(conn) => {
                let joins = join.iter().map(|topic| (true, self.channel(topic)));
                let leaves = leave.iter().map(|topic| (false, self.channel(topic)));
                let mut masters: FxHashMap<Option<usize>, Vec<(bool, String)>> =
                    FxHashMap::default();
                for (join, channel) in joins.chain(leaves) {
                    let master = self.masters.of(&channel);
                    masters.entry(master).or_default().push((join, channel));
                }
                let refused = try_join_all(masters.into_iter().map(|(master, changes)| {
                    on_master(conn.clone(), master.is_some(), changes, self.seen(master))
                }))
                .await?;
                let mut refused: FxHashMap<String, RedisError> =
                    refused.into_iter().flatten().collect();
                join.iter()
                    .filter_map(|topic| {
                        let e = refused.remove(&self.channel(topic))?;
                        Some((topic.clone(), e))
                    })
                    .collect()
            }
        };
        for topic in join {
            if !refused.iter().any(|(refused, _)| refused == topic) {
                self.taken(topic);
                self.subscribed.insert(topic.clone());
            }
        }
        for (topic, e) in &refused {
            self.refuse(topic, e);
        }
        for topic in leave {
            self.subscribed.remove(topic);
        }
        Ok(())
    }

    /// The topic of a channel of this link's namespace.
    fn topic<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        channel
            .strip_prefix(self.channel_prefix.as_bytes())
            .and_then(|topic| std::str::from_utf8(topic).ok())
    }

    /// The messages Redis delivered before the connection ended (a failed publish or ping ends
    /// it with pushes still queued): this process's to fan out all the same. Dropped with the
    /// queue, they were lost and counted nowhere.
    fn fan_out_left(&mut self, pushes: &mut Pushes) {
        let mut ended = Vec::new();
        // What is queued now, no more: the connection may still be delivering (a publish that
        // timed out, or was refused), and this must end for the link to reconnect.
        for _ in 0..pushes.receiver.len() {
            let Ok(push) = pushes.receiver.try_recv() else {
                break;
            };
            self.on_push(push, &pushes.backlog, &mut ended);
        }
    }

    /// Handle one push from Redis, taken off `backlog`; false when it says the connection is
    /// gone. A topic whose subscription may have ended without this link asking goes to `ended`.
    fn on_push(&mut self, push: PushInfo, backlog: &ByteBound, ended: &mut Vec<Arc<str>>) -> bool {
        match push.kind {
            PushKind::Disconnection => return false,
            PushKind::Message | PushKind::SMessage => backlog.release(message_size(&push)),
            // A master that gives a slot away ends that slot's shard subscriptions itself, and
            // the crate, which counts the push as confirmed, would not renew them: the registry
            // decides again, and the crate follows the `MOVED` to the new master. The
            // confirmations of this link's own `SUNSUBSCRIBE`s come here too: the registry sees
            // those topics unwanted and nothing is sent, or wanted again since, and the
            // repeated `SSUBSCRIBE` is a no-op for Redis.
            PushKind::SUnsubscribe if self.cluster => {
                let channel = match push.data.first() {
                    Some(Value::BulkString(channel)) => channel,
                    _ => return true,
                };
                if let Some(topic) = self.topic(channel) {
                    self.subscribed.remove(topic);
                    ended.push(Arc::from(topic));
                }
                return true;
            }
            // Subscription replies, and anything else the connection may push: nothing to do.
            _ => return true,
        }
        let mut data = push.data.into_iter();
        let (Some(Value::BulkString(channel)), Some(Value::BulkString(message))) =
            (data.next(), data.next())
        else {
            return true;
        };
        let Some(topic) = self.topic(&channel) else {
            return true;
        };
        let Some(incoming) = remote::decode(Bytes::from(message)) else {
            return true;
        };
        if incoming.origin == self.remote().origin {
            return true;
        }
        let key = (
            incoming.origin,
            self.cluster.then(|| Slot::for_key(&channel)),
        );
        if self.last_seq.len() >= MAX_SEQUENCES && !self.last_seq.contains_key(&key) {
            self.last_seq.clear();
        }
        let last = self.last_seq.entry(key).or_insert(0);
        if incoming.seq <= *last {
            return true;
        }
        *last = incoming.seq;
        let stats = &self.shared.stats;
        stats.add(Counter::RedisReceived, 1);
        let len = incoming.payload.len();
        // RSV1 in the opcode byte: the publisher asked for compression (permessage-deflate).
        let compress = incoming.opcode & 0x40 != 0;
        let frame = OutFrame::new(incoming.opcode & 0x0f, incoming.payload);
        self.shared.publish_local(topic, frame, len, None, compress);
        true
    }
}

/// (Un)subscribe `changes`, whose channels are all on one master (`known`; else on masters not
/// known, one at a time). Its first command goes alone: through a master the link has no
/// connection to yet (restarted, or given slots since the link connected), each command that
/// finds none opens one of its own, and the crate keeps the last, closing the others with
/// their subscriptions (seven at once on a restarted master, most of its channels lost).
/// Once the first has connected it, the others go at once. Returns the channels Redis refused
/// (`refuses_channel`), with why.
async fn on_master(
    conn: ClusterConnection,
    known: bool,
    changes: Vec<(bool, String)>,
    seen: impl Fn() -> u64 + Copy,
) -> RedisResult<Vec<(String, RedisError)>> {
    let change = |mut conn: ClusterConnection, join: bool, channel: String| async move {
        let changed = if join {
            patiently(seen, TIMEOUT, conn.ssubscribe(&channel)).await
        } else {
            patiently(seen, TIMEOUT, conn.sunsubscribe(&channel)).await
        };
        match changed {
            Err(e) if refuses_channel(&e) => Ok(Some((channel, e))),
            changed => changed.map(|()| None),
        }
    };
    let mut refused = Vec::new();
    let mut changes = changes.into_iter();
    if !known {
        for (join, channel) in changes {
            refused.extend(change(conn.clone(), join, channel).await?);
        }
        return Ok(refused);
    }
    if let Some((join, channel)) = changes.next() {
        refused.extend(change(conn.clone(), join, channel).await?);
    }
    let rest = try_join_all(changes.map(|(join, channel)| change(conn.clone(), join, channel)));
    refused.extend(rest.await?.into_iter().flatten());
    Ok(refused)
}

/// A connection's pushes, as the link receives them, and the bytes of the messages among them
/// that the link has not fanned out yet.
struct Pushes {
    receiver: mpsc::UnboundedReceiver<PushInfo>,
    backlog: Arc<ByteBound>,
}

/// The push sender for one connection to Redis, and where its pushes arrive. The channel is
/// unbounded in count, but the messages in it (what Redis sends at the rate others publish)
/// are bounded by `INCOMING_BYTES`; the other pushes answer this link's own commands, or end
/// the connection.
fn push_queue(shared: &Arc<Shared>, arrived: Arc<Arrivals>) -> (impl AsyncPushSender, Pushes) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let backlog = Arc::new(ByteBound::default());
    let (shared, held) = (shared.clone(), backlog.clone());
    let push = move |push: PushInfo| {
        arrived.note(&push);
        let message = matches!(push.kind, PushKind::Message | PushKind::SMessage);
        // A cluster's connections, one per master, charge it from their own tasks.
        if !message || held.charge(message_size(&push), INCOMING_BYTES) {
            return sender.send(push);
        }
        // Dropped; this process's own publishes coming back are not lost (its subscribers here
        // had them).
        if !own_message(&shared, &push) {
            shared.stats.add(Counter::RedisReceivedLost, 1);
            if held.lost() {
                let why = "64 MiB of them already wait to be fanned out here";
                shared.log(LogKind::RedisInboundBacklog, "", 0, why);
            }
        }
        Ok(())
    };
    (push, Pushes { receiver, backlog })
}

/// The bytes a message push holds: its channel's name, the message and `PUSH_OVERHEAD`.
fn message_size(push: &PushInfo) -> usize {
    let bytes = |value: &Value| match value {
        Value::BulkString(bytes) => bytes.len(),
        _ => 0,
    };
    PUSH_OVERHEAD + push.data.iter().map(bytes).sum::<usize>()
}

/// Whether a message push is one of this process's own publishes coming back (its
/// subscribers here had it already: not lost when dropped).
fn own_message(shared: &Shared, push: &PushInfo) -> bool {
    let origin = match push.data.get(1) {
        Some(Value::BulkString(message)) => remote::origin(message),
        _ => None,
    };
    let remote = shared.remote.as_ref();
    origin.is_some() && origin == remote.map(|remote| remote.origin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::ServerConfig;
    use crate::engine::pubsub::remote::Remote;

    fn message(origin: u64, seq: u64, size: usize) -> PushInfo {
        let channel = Value::BulkString(b"brioche:t".to_vec());
        let payload = vec![b'x'; size];
        let message = Value::BulkString(remote::encode(origin, seq, 1, &payload).to_vec());
        PushInfo {
            kind: PushKind::Message,
            data: vec![channel, message],
        }
    }

    #[test]
    fn messages_from_redis_wait_up_to_64_mib_and_the_rest_are_counted_lost() {
        let (remote, _inbox) = Remote::new();
        let own = remote.origin;
        let shared = Arc::new(Shared::new(ServerConfig::default(), Some(remote)).unwrap());
        let (sender, mut pushes) = push_queue(&shared, Arrivals::new(false));
        let size = message_size(&message(1, 1, 1 << 20));
        let fit = INCOMING_BYTES / size;
        assert_eq!(fit, 63);
        // Nothing is taken off: 63 of 1 MiB wait, 37 others are lost, this process's own
        // publishes coming back are dropped too but not lost.
        for seq in 1..=100 {
            sender.send(message(1, seq, 1 << 20)).unwrap();
        }
        sender.send(message(own, 1, 1 << 20)).unwrap();
        // The answers to the link's commands are never dropped.
        let reply = PushInfo {
            kind: PushKind::Subscribe,
            data: vec![],
        };
        sender.send(reply).unwrap();
        assert_eq!(shared.stats.get(Counter::RedisReceivedLost), 37);
        assert_eq!(pushes.backlog.held(), fit * size);
        assert!(pushes.backlog.overflowing());
        let mut held = 0;
        while let Ok(push) = pushes.receiver.try_recv() {
            if push.kind == PushKind::Message {
                pushes.backlog.release(message_size(&push));
                held += 1;
            }
        }
        assert_eq!(held, fit);
        // Emptied: the next loss is news again, and room is back.
        assert!(!pushes.backlog.overflowing());
        sender.send(message(1, 101, 1 << 20)).unwrap();
        assert_eq!(pushes.backlog.held(), size);
    }

    fn range(first: i64, last: i64, nodes: &[(&str, i64)]) -> Value {
        let mut range = vec![Value::Int(first), Value::Int(last)];
        for (host, port) in nodes {
            range.push(Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(*port),
                Value::BulkString(b"id".to_vec()),
            ]));
        }
        Value::Array(range)
    }

    #[test]
    fn each_slot_is_given_the_master_cluster_slots_lists_first() {
        let ranges = vec![
            range(0, 5460, &[("10.0.0.1", 6380), ("10.0.0.4", 6380)]),
            range(5461, 10922, &[("10.0.0.2", 6380)]),
            range(10923, 16383, &[("10.0.0.1", 6380)]),
        ];
        let Masters {
            of_slot,
            first_slot,
        } = masters(&ranges);
        assert_eq!(of_slot.len(), 16384);
        let of = |slot: usize| of_slot[slot].unwrap();
        assert_eq!([of(0), of(5460), of(5461), of(10922)], [0, 0, 1, 1]);
        assert_eq!([of(10923), of(16383)], [0, 0]);
        // Each master's first slot, which its PING goes by.
        assert_eq!(first_slot, [0, 5461]);
        let nothing = masters(&[Value::Int(1)]);
        assert!(nothing.of_slot.is_empty() && nothing.first_slot.is_empty());
        // A range past the last slot, or backwards, is no range.
        let odd = masters(&[range(16000, 16384, &[("a", 1)]), range(9, 3, &[("b", 1)])]);
        assert!(odd.of_slot.is_empty() && odd.first_slot.is_empty());
    }

    #[test]
    fn only_a_refusal_is_logged_again_during_an_outage() {
        assert!(["WRONGPASS", "NOAUTH", "NOPERM"]
            .into_iter()
            .all(refusal_code));
        let passing = [
            "LOADING",
            "CLUSTERDOWN",
            "TRYAGAIN",
            "MASTERDOWN",
            "ERR",
            "BUSY",
        ];
        assert!(!passing.into_iter().any(refusal_code));
    }

    #[test]
    fn a_refusal_is_quoted_with_its_code_and_cut() {
        let refused = RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "refused",
            "x".repeat(1000),
        ));
        let line = why("cannot connect", &refused).line;
        assert!(line.starts_with("cannot connect: refused - AuthenticationFailed: xxx"));
        assert!(line.ends_with("x..."));
        assert_eq!(line.len(), "cannot connect: ".len() + MAX_WHY + 3);
        let refused = redis::make_extension_error("NOPERM".into(), Some("no permissions".into()));
        let down = why("subscribe failed", &refused);
        assert_eq!(down.line, "subscribe failed: NOPERM no permissions");
        assert_eq!(down.code.as_deref(), Some("NOPERM"));
    }

    #[test]
    fn the_nodes_of_cluster_slots_keep_the_urls_tls_and_credentials() {
        let ranges = vec![
            range(0, 5460, &[("10.0.0.1", 6380), ("10.0.0.4", 6380)]),
            range(5461, 10922, &[("", 6380), ("?", 6380)]),
            range(10923, 16000, &[("10.0.0.3", 6380), ("10.0.0.1", 6380)]),
            range(16001, 16383, &[("10.0.0.3", 6380)]),
        ];
        let info = "rediss://user:secret@redis.example:6390"
            .into_connection_info()
            .unwrap();
        let nodes = listed_nodes(&ranges, &info);
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:6380", "10.0.0.4:6380", "10.0.0.3:6380"]);
        for node in &nodes {
            assert!(matches!(
                node.addr(),
                ConnectionAddr::TcpTls {
                    insecure: false,
                    ..
                }
            ));
            let redis = node.redis_settings();
            assert_eq!(
                (redis.username(), redis.password()),
                (Some("user"), Some("secret"))
            );
        }
        let plain = "redis://127.0.0.1:7000".into_connection_info().unwrap();
        let nodes = listed_nodes(&[range(0, 16383, &[("127.0.0.1", 7001)])], &plain);
        assert!(matches!(nodes[0].addr(), ConnectionAddr::Tcp(host, 7001) if host == "127.0.0.1"));
    }
}
