//! `cohort cache staged` and `cohort cache evict`: the nodes' staging caches.

use std::process::ExitCode;
use std::time::Duration;

use crate::connection::ApiChannel as Channel;
use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{EvictNodeCacheRequest, ListNodeCachesRequest, NodeCache};

use crate::metrics::bytes;
use crate::output::{Output, print_json, status_error, table};

/// Lists the staging caches of `node` (empty: every connected node). Exit 1
/// when a node could not answer.
pub async fn staged(client: &mut JobServiceClient<Channel>, node: &str, out: Output) -> anyhow::Result<ExitCode> {
    let response =
        client.list_node_caches(ListNodeCachesRequest { node: node.into() }).await.map_err(status_error)?.into_inner();
    if out == Output::Json {
        print_json(&response)?;
    } else {
        print_caches(&response.nodes);
    }
    let failed = response.nodes.iter().any(|n| !n.error.is_empty());
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn print_caches(nodes: &[NodeCache]) {
    let mut t = table(&["NODE", "USER", "SHA256", "SIZE", "FILES", "LAST USED", "PINNED BY"]);
    let now = cohort_proto::now_unix_ms();
    for node in nodes {
        let Some(cache) = &node.cache else { continue };
        for c in &cache.entries {
            let ago = Duration::from_secs(((now - c.last_use_unix_ms).max(0) / 1000) as u64);
            t.add_row([
                node.node.clone(),
                c.user.clone(),
                c.sha256.chars().take(12).collect(),
                bytes(c.bytes),
                c.files.to_string(),
                format!("{} ago", humantime::format_duration(ago)),
                if c.pinned_by.is_empty() { "-".into() } else { c.pinned_by.join(", ") },
            ]);
        }
    }
    say!("{t}");
    for node in nodes {
        match &node.cache {
            None => say!("{}: {}", node.node, node.error),
            Some(cache) => {
                let limit = if cache.limit_bytes == 0 {
                    "no limit".into()
                } else {
                    format!("limit {}", bytes(cache.limit_bytes))
                };
                let pinned: u64 = cache.entries.iter().filter(|c| !c.pinned_by.is_empty()).map(|c| c.bytes).sum();
                say!(
                    "{}: {} in {} entries, {} pinned by running jobs ({limit})",
                    node.node,
                    bytes(cache.total_bytes),
                    cache.entries.len(),
                    bytes(pinned)
                );
                if cache.unknown_pins {
                    say!(
                        "  a launch the last agent left runs with inputs not known: nothing is collected until it ends"
                    );
                }
                for error in &cache.errors {
                    say!("  cannot list {error}");
                }
            }
        }
    }
}

/// The full digests `wanted` names among what `cache` holds: each a unique
/// prefix of at least 8 hex digits, or a whole digest.
fn resolve(node: &str, cache: Option<&cohort_proto::CacheAnswer>, wanted: &[String]) -> anyhow::Result<Vec<String>> {
    let mut known: Vec<&str> = cache.map(|c| c.entries.iter().map(|e| e.sha256.as_str()).collect()).unwrap_or_default();
    known.sort_unstable();
    known.dedup();
    let mut digests = Vec::new();
    for prefix in wanted {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.len() < 8 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            anyhow::bail!(
                "{prefix:?} is not a digest: give at least 8 hex digits as `cohort cache staged --node {node}` shows them"
            );
        }
        let matches: Vec<&str> = known.iter().copied().filter(|d| d.starts_with(&prefix)).collect();
        match matches.as_slice() {
            [one] => digests.push((*one).to_owned()),
            [] if prefix.len() == 64 => digests.push(prefix),
            [] => anyhow::bail!(
                "no content {prefix} in the staging caches of node {node}; `cohort cache staged --node {node}` lists them"
            ),
            // Whole digests: prefixes of a fixed length could be the same.
            many => anyhow::bail!(
                "{prefix} names {} contents of node {node} ({}{}); give more digits",
                many.len(),
                many.iter().take(4).copied().collect::<Vec<_>>().join(", "),
                if many.len() > 4 { ", ..." } else { "" }
            ),
        }
    }
    Ok(digests)
}

/// Removes content from `node`'s staging caches. Exit 1 when some was refused.
pub async fn evict(
    client: &mut JobServiceClient<Channel>,
    node: &str,
    wanted: &[String],
    out: Output,
) -> anyhow::Result<ExitCode> {
    let listed =
        client.list_node_caches(ListNodeCachesRequest { node: node.into() }).await.map_err(status_error)?.into_inner();
    let current = listed.nodes.into_iter().next().unwrap_or_default();
    if !current.error.is_empty() {
        anyhow::bail!("{}", current.error);
    }
    let digests = resolve(node, current.cache.as_ref(), wanted)?;
    let answer = client
        .evict_node_cache(EvictNodeCacheRequest { node: node.into(), sha256: digests })
        .await
        .map_err(status_error)?
        .into_inner();
    if !answer.error.is_empty() {
        anyhow::bail!("{}", answer.error);
    }
    let cache = answer.cache.clone().unwrap_or_default();
    if out == Output::Json {
        print_json(&answer)?;
    } else {
        for digest in &cache.evicted {
            say!("removed {digest} from node {node}");
        }
        for why in &cache.refused {
            say!("kept {why}");
        }
        say!("node {node} now holds {} in {} entries", bytes(cache.total_bytes), cache.entries.len());
    }
    Ok(if cache.refused.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cohort_proto::{CacheAnswer, CachedContent};

    fn cache(digests: &[&str]) -> CacheAnswer {
        CacheAnswer {
            entries: digests.iter().map(|d| CachedContent { sha256: d.to_string(), ..Default::default() }).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_prefix_names_one_content_or_says_why_not() {
        let (a, b) = ("ab".repeat(32), format!("abab{}", "cd".repeat(30)));
        let held = cache(&[&a, &b, &a]);
        assert_eq!(resolve("n1", Some(&held), &["ABABABAB".into()]).unwrap(), std::slice::from_ref(&a));
        let short = resolve("n1", Some(&held), &["abab".into()]).unwrap_err().to_string();
        assert!(short.contains("at least 8 hex digits"), "{short}");
        let many = resolve("n1", Some(&cache(&[&a, &format!("{}00", &a[..62])])), &["abababab".into()]);
        let many = many.unwrap_err().to_string();
        assert!(many.contains("names 2 contents of node n1"), "{many}");
        let other = format!("{}00", &a[..62]);
        assert!(many.ends_with(&format!("({other}, {a}); give more digits")), "{many}");
        let missing = resolve("n1", Some(&held), &["ffffffff".into()]).unwrap_err().to_string();
        assert!(missing.contains("no content ffffffff in the staging caches of node n1"), "{missing}");
        // A whole digest the node no longer lists goes through: the node answers for it.
        assert_eq!(resolve("n1", None, &["ee".repeat(32)]).unwrap(), ["ee".repeat(32)]);
    }
}
