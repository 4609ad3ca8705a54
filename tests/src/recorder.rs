//! A `metrics` recorder that tallies what is reported, for tests that
//! check a library's metrics (install it with `metrics::with_local_recorder`
//! around the calls on the test's own thread).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Counter totals (and histogram sample counts) by name and labels, as the
/// client reports them through the `metrics` facade.
#[derive(Default, Clone)]
pub struct Counters(Arc<Mutex<BTreeMap<String, u64>>>);

struct Tally(String, Counters);

impl metrics::CounterFn for Tally {
    fn increment(&self, value: u64) {
        *self.1 .0.lock().unwrap().entry(self.0.clone()).or_default() += value;
    }
    fn absolute(&self, value: u64) {
        self.1 .0.lock().unwrap().insert(self.0.clone(), value);
    }
}

impl metrics::HistogramFn for Tally {
    fn record(&self, _: f64) {
        metrics::CounterFn::increment(self, 1);
    }
}

impl metrics::Recorder for Counters {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(Arc::new(Tally(Counters::name(key), self.clone())))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::from_arc(Arc::new(Tally(Counters::name(key), self.clone())))
    }
}

impl Counters {
    /// `name{label=value,...}`.
    fn name(key: &metrics::Key) -> String {
        let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        format!("{}{{{}}}", key.name(), labels.join(","))
    }

    /// The total of `name` (as `name{label=value,...}`, labels in the
    /// order given), 0 if never reported.
    pub fn get(&self, name: &str) -> u64 {
        self.0.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}
