//! The `INSERT` of outbox rows, and for a table with sequences, the
//! numbering of each row within its aggregate's history.
//!
//! A sequenced table `t` has a counter table `t_aggregates`, one row per
//! aggregate: the last sequence number given, the latest number of each
//! event type (`last_by_type`), and that map as it was before the last
//! write (`prev_by_type`). One statement upserts the counters of the
//! batch's aggregates, sorted by key, and holds their row locks until the
//! writer's transaction ends: a second writer of the same aggregate waits,
//! so for one aggregate the commits follow one another as the numbers
//! do, which a `bigserial` is not. Each row gets its number and its
//! `previous` map (for each event type, the number of the latest earlier
//! event of that type in the aggregate), from which a consumer bound to
//! some of the types finds the event it must wait for.

/// The statement writing rows into `name`, from six arrays bound from
/// `$first` on (see [`crate::Table::insert_statement`]), after the extra
/// common table expressions `with` (none when empty).
pub(crate) fn statement(name: &str, sequenced: bool, first: usize, with: &str) -> String {
    let [a, b, c, d, e, f] = std::array::from_fn(|i| first + i);
    let rows = format!(
        "unnest(${a}::uuid[], ${b}::text[], ${c}::text[], ${d}::text[], ${e}::jsonb[], ${f}::jsonb[])"
    );
    let columns = "transaction_id, aggregate_type, aggregate_id, event_type, payload, headers";
    if !sequenced {
        let with = if with.is_empty() {
            String::new()
        } else {
            format!("WITH {with} ")
        };
        return format!("{with}INSERT INTO {name} ({columns}) SELECT * FROM {rows}");
    }
    let with = if with.is_empty() {
        String::new()
    } else {
        format!("{with}, ")
    };
    format!(
        "WITH {with}batch AS ( \
             SELECT b.*, \
               row_number() OVER (PARTITION BY aggregate_type, aggregate_id ORDER BY ord) AS rank \
             FROM {rows} WITH ORDINALITY AS b({columns}, ord)), \
         per_aggregate AS ( \
             SELECT aggregate_type, aggregate_id, count(*) AS n, \
               jsonb_object_agg(event_type, rank ORDER BY ord) AS types \
             FROM batch GROUP BY aggregate_type, aggregate_id), \
         counters AS ( \
             INSERT INTO {name}_aggregates AS a (aggregate_type, aggregate_id, last_seq, last_by_type) \
             SELECT aggregate_type, aggregate_id, n, types FROM per_aggregate \
             ORDER BY aggregate_type, aggregate_id \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
               prev_by_type = a.last_by_type, \
               last_seq = a.last_seq + excluded.last_seq, \
               last_by_type = a.last_by_type || ( \
                 SELECT jsonb_object_agg(key, value::bigint + a.last_seq) \
                 FROM jsonb_each_text(excluded.last_by_type)), \
               updated_at = now() \
             RETURNING aggregate_type, aggregate_id, last_seq, prev_by_type), \
         numbered AS ( \
             SELECT b.transaction_id, b.aggregate_type, b.aggregate_id, b.event_type, b.payload, \
               b.headers, b.ord, c.last_seq - p.n + b.rank AS seq, c.prev_by_type AS prev \
             FROM batch b JOIN counters c USING (aggregate_type, aggregate_id) \
               JOIN per_aggregate p USING (aggregate_type, aggregate_id)) \
         INSERT INTO {name} ({columns}, seq, previous) \
         SELECT transaction_id, aggregate_type, aggregate_id, event_type, payload, headers, seq, \
           prev || coalesce(jsonb_object_agg(event_type, seq) OVER ( \
             PARTITION BY aggregate_type, aggregate_id ORDER BY ord \
             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), '{{}}'::jsonb) \
         FROM numbered ORDER BY ord"
    )
}
