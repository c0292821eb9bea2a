//! Topic registry: topic name -> subscribers.
//!
//! Two levels of locks so that the registry is never a global bottleneck: the map of topics is
//! behind a read-mostly `RwLock` (write-locked only to create or drop a topic), and each topic
//! has its own `RwLock` over its subscribers. Publishing read-locks the map just long enough to
//! clone the topic's `Arc`, then read-locks that one topic, so publishes to different topics (or
//! to the same topic) proceed in parallel.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexMap;
use parking_lot::RwLock;
use rustc_hash::FxBuildHasher;

use crate::engine::platform::{visit_ahead, Prefetch};

struct Subscribers<S> {
    /// In the order they subscribed (an unsubscribe moves the last one into its place), not in
    /// hash order: a fan-out then visits connections roughly in the order they were accepted,
    /// which is the order their `Conn`s, their kernel sockets and, on loopback, their clients'
    /// buffers were allocated. Hash order (an `FxHashMap`) scattered those visits: S3 with 1 and
    /// 32 messages outstanding made 1.02-1.06× and 1.05× the deliveries in insertion order, at
    /// 0.92-0.98× the server's CPU per delivery. `swap_remove` keeps an unsubscribe O(1).
    by_id: IndexMap<u64, S, FxBuildHasher>,
    /// The last subscriber left and the topic is being dropped from the map: nobody may join
    /// it any more (they create a fresh topic instead).
    dead: bool,
}

struct Topic<S> {
    subscribers: RwLock<Subscribers<S>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unsubscribed {
    /// It was not subscribed.
    No,
    Yes,
    /// It was the topic's last subscriber: the topic is gone.
    Last,
}

/// One topic, held: its subscribers as they are when visited. A topic whose last subscriber
/// left stays empty; joining the name again makes a new topic, never this one.
pub(crate) struct TopicRef<S>(Arc<Topic<S>>);

impl<S> TopicRef<S> {
    /// Whether `other` is this very topic (not merely one of the same name made since).
    pub(crate) fn is(&self, other: &TopicRef<S>) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<S: Prefetch> TopicRef<S> {
    /// Call `f` for every subscriber while holding only this topic's read lock; each
    /// subscriber is prefetched two visits ahead of its own (`platform::visit_ahead`). Only that
    /// first stage: a publish's push writes the queue's tail, which no hint of the queue points
    /// at, and a visit is too short for the lines holding hints to arrive before they are read.
    ///
    /// The lock is taken recursively: a visit can contain another visit of the same topic (a
    /// fan-out's send delivers the server's pending run of publishes, `ws/publish_run.rs`, which
    /// may be this topic's), and parking_lot's plain `read` waits behind a writer that is itself
    /// waiting for the outer visit to end (an unsubscribe): a deadlock, of that thread and of
    /// every thread then waiting for the run.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, &S)) {
        visit_ahead(
            self.0.subscribers.read_recursive().by_id.iter(),
            |(_, s)| s.prefetch(),
            |_| {},
            |(id, s)| f(*id, s),
        );
    }
}

/// Lock order: no method holds the map lock and a topic's lock at the same time, so there is no
/// order to get wrong.
pub(crate) struct TopicRegistry<S> {
    /// Keyed by names clients may choose, so hashed with std's per-process random key: with an
    /// unkeyed hash (FxHash), names made to share a bucket would turn each lookup into a scan.
    topics: RwLock<HashMap<Arc<str>, Arc<Topic<S>>>>,
}

impl<S> Default for TopicRegistry<S> {
    fn default() -> Self {
        Self {
            topics: RwLock::new(HashMap::default()),
        }
    }
}

impl<S: Clone> TopicRegistry<S> {
    fn topic(&self, name: &str) -> Option<Arc<Topic<S>>> {
        self.topics.read().get(name).cloned()
    }

    fn topic_or_create(&self, name: &str) -> (Arc<str>, Arc<Topic<S>>) {
        if let Some((key, topic)) = self.topics.read().get_key_value(name) {
            return (key.clone(), topic.clone());
        }
        let mut topics = self.topics.write();
        // Someone may have created it since the read lock was released.
        if let Some((key, topic)) = topics.get_key_value(name) {
            return (key.clone(), topic.clone());
        }
        let key: Arc<str> = Arc::from(name);
        let topic = Arc::new(Topic {
            subscribers: RwLock::new(Subscribers {
                by_id: IndexMap::default(),
                dead: false,
            }),
        });
        topics.insert(key.clone(), topic.clone());
        (key, topic)
    }

    /// Drop `topic` from the map if it is still the entry for `name`.
    fn forget(&self, name: &str, topic: &Arc<Topic<S>>) {
        let mut topics = self.topics.write();
        if topics.get(name).is_some_and(|t| Arc::ptr_eq(t, topic)) {
            topics.remove(name);
        }
    }

    /// Add subscriber `id`; returns the interned topic name, whether it was new, and whether
    /// it is the topic's only subscriber (the topic's first, which Redis must hear about).
    pub(crate) fn subscribe(&self, name: &str, id: u64, subscriber: S) -> (Arc<str>, bool, bool) {
        loop {
            let (key, topic) = self.topic_or_create(name);
            let mut subs = topic.subscribers.write();
            if subs.dead {
                drop(subs);
                self.forget(name, &topic);
                continue;
            }
            let added = subs.by_id.insert(id, subscriber.clone()).is_none();
            let first = added && subs.by_id.len() == 1;
            return (key, added, first);
        }
    }

    /// Remove subscriber `id`. Empty topics are dropped.
    pub(crate) fn unsubscribe(&self, name: &str, id: u64) -> Unsubscribed {
        let Some(topic) = self.topic(name) else {
            return Unsubscribed::No;
        };
        {
            let mut subs = topic.subscribers.write();
            if subs.by_id.swap_remove(&id).is_none() {
                return Unsubscribed::No;
            }
            if !subs.by_id.is_empty() {
                return Unsubscribed::Yes;
            }
            subs.dead = true;
        }
        self.forget(name, &topic);
        Unsubscribed::Last
    }

    /// Every topic with a subscriber now: what a new Redis connection subscribes to.
    pub(crate) fn names(&self) -> Vec<Arc<str>> {
        self.topics.read().keys().cloned().collect()
    }

    pub(crate) fn is_subscribed(&self, name: &str, id: u64) -> bool {
        self.topic(name)
            .is_some_and(|t| t.subscribers.read().by_id.contains_key(&id))
    }

    pub(crate) fn subscriber_count(&self, name: &str) -> usize {
        self.topic(name)
            .map_or(0, |t| t.subscribers.read().by_id.len())
    }

    /// The topic `name`, to visit its subscribers now or later (a batch's run of publishes to
    /// it); `None` if it has no subscriber.
    pub(crate) fn get(&self, name: &str) -> Option<TopicRef<S>> {
        self.topic(name).map(TopicRef)
    }

    #[cfg(test)]
    fn topic_count(&self) -> usize {
        self.topics.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    impl Prefetch for u64 {
        fn prefetch(&self) {}
    }

    #[test]
    fn subscribe_is_idempotent_and_counts() {
        let r = TopicRegistry::<u64>::default();
        assert!(r.subscribe("chat", 1, 1).1);
        assert_eq!(r.subscribe("chat", 1, 1), ("chat".into(), false, false));
        assert_eq!(r.subscribe("chat", 2, 2), ("chat".into(), true, false));
        assert_eq!(r.subscriber_count("chat"), 2);
        assert!(r.is_subscribed("chat", 2));
        assert!(!r.is_subscribed("news", 2));
    }

    #[test]
    fn unsubscribing_the_last_subscriber_drops_the_topic() {
        let r = TopicRegistry::<u64>::default();
        r.subscribe("a", 1, 1);
        r.subscribe("b", 1, 1);
        assert!(r.subscribe("a", 2, 2).1);
        assert_eq!(r.unsubscribe("a", 2), Unsubscribed::Yes);
        assert_eq!(r.unsubscribe("a", 1), Unsubscribed::Last);
        assert_eq!(r.unsubscribe("a", 1), Unsubscribed::No);
        assert_eq!(r.subscriber_count("a"), 0);
        assert_eq!(r.topic_count(), 1);
        assert_eq!(r.names(), vec![Arc::<str>::from("b")]);
        // A topic dropped and made again has a first subscriber again.
        assert!(r.subscribe("a", 3, 3).2);
    }

    #[test]
    fn for_each_visits_every_subscriber_once() {
        let r = TopicRegistry::<u64>::default();
        for id in 0..100 {
            r.subscribe("t", id, id * 10);
        }
        let mut seen = Vec::new();
        r.get("t").unwrap().for_each(|id, s| {
            assert_eq!(*s, id * 10);
            seen.push(id);
        });
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn for_each_visits_subscribers_in_the_order_they_subscribed() {
        let r = TopicRegistry::<u64>::default();
        // Ids as connections get them, subscribing out of id order.
        let order: Vec<u64> = (0..200).map(|i| (i * 7919) % 200).collect();
        for &id in &order {
            r.subscribe("t", id, id);
        }
        let mut seen = Vec::new();
        r.get("t").unwrap().for_each(|id, _| seen.push(id));
        assert_eq!(seen, order);
        // An unsubscribe moves the last subscriber into the gap; the rest keep their order.
        assert_eq!(r.unsubscribe("t", order[10]), Unsubscribed::Yes);
        let mut expected = order.clone();
        expected.swap_remove(10);
        seen.clear();
        r.get("t").unwrap().for_each(|id, _| seen.push(id));
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_visit_within_a_visit_does_not_wait_for_a_waiting_writer() {
        let r = Arc::new(TopicRegistry::<u64>::default());
        r.subscribe("t", 1, 1);
        let (done, finished) = std::sync::mpsc::channel();
        let visitor = {
            let r = r.clone();
            thread::spawn(move || {
                let topic = r.get("t").unwrap();
                let mut writer = None;
                topic.for_each(|_, _| {
                    let r = r.clone();
                    writer = Some(thread::spawn(move || r.subscribe("t", 2, 2)));
                    // Until the writer waits for this visit to end: a shared lock is refused
                    // to newcomers once a writer waits. Bounded: 10 s at most.
                    for _ in 0..100_000 {
                        if topic.0.subscribers.try_read().is_none() {
                            break;
                        }
                        thread::sleep(std::time::Duration::from_micros(100));
                    }
                    assert!(
                        topic.0.subscribers.try_read().is_none(),
                        "no writer came to wait"
                    );
                    topic.for_each(|_, _| {});
                });
                writer.unwrap().join().unwrap();
                done.send(()).unwrap();
            })
        };
        // With a plain `read` the inner visit never returns (and the writer never gets in).
        let outcome = finished.recv_timeout(std::time::Duration::from_secs(10));
        assert!(outcome.is_ok(), "the inner visit waited for the writer");
        visitor.join().unwrap();
        assert_eq!(r.subscriber_count("t"), 2);
    }

    #[test]
    fn concurrent_subscribe_and_unsubscribe_lose_nothing() {
        let r = Arc::new(TopicRegistry::<u64>::default());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let r = r.clone();
                thread::spawn(move || {
                    for i in 0..2_000u64 {
                        let id = t * 1_000_000 + i;
                        r.subscribe("hot", id, id);
                        if i % 2 == 0 {
                            assert_ne!(r.unsubscribe("hot", id), Unsubscribed::No);
                        }
                        r.subscribe(&format!("t{t}"), id, id);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(r.subscriber_count("hot"), 4 * 1_000);
        for t in 0..4 {
            assert_eq!(r.subscriber_count(&format!("t{t}")), 2_000);
        }
    }
}
