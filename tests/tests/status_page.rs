//! The pool's HTTP listener (issue #19) on real parts: a real pool with
//! real nodes over QUIC, `/metrics` read by a Prometheus text-format
//! parser, the health routes, and the status page in a real headless
//! Chromium (Debian's, installed by `cargo xtask test`).

use anyhow::{ensure, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tidepool_tests::cluster::*;

const TOKEN: &str = "a-test-token-of-enough-length";

/// Every sample of a scrape by name (histogram buckets under their own
/// name), after checking that every family has HELP and TYPE.
fn scrape(text: &str) -> Result<BTreeMap<String, f64>> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).context("not Prometheus text")?;
    let mut helps = BTreeSet::new();
    let mut types = BTreeSet::new();
    for l in text.lines() {
        let mut w = l.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("#"), Some("HELP"), Some(name)) => {
                helps.insert(name.to_owned());
            }
            (Some("#"), Some("TYPE"), Some(name)) => {
                types.insert(name.to_owned());
            }
            _ => {}
        }
    }
    ensure!(
        helps == types,
        "HELP and TYPE differ: {helps:?} vs {types:?}"
    );
    ensure!(helps.len() >= 30, "only {} families", helps.len());
    let mut out = BTreeMap::new();
    for s in &parsed.samples {
        let family = s.metric.trim_end_matches("_sum").trim_end_matches("_count");
        ensure!(
            helps.contains(&s.metric) || helps.contains(family),
            "sample {} has no HELP/TYPE",
            s.metric
        );
        ensure!(
            s.metric.starts_with("tidepool_"),
            "{} lacks the prefix",
            s.metric
        );
        let v = match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => continue,
        };
        if s.labels.is_empty() {
            out.insert(s.metric.clone(), v);
        }
    }
    for name in parsed.docs.keys() {
        ensure!(name.starts_with("tidepool_"), "{name} lacks the prefix");
    }
    Ok(out)
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_counters_rise_with_work() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(61);
    let pool = start_pool_with_http(
        &dir.path().join("pool"),
        &keys,
        test_pool_config(&keys),
        TOKEN,
    )
    .await?;
    let http = pool.http_addr.context("no http listener")?;
    // Without the token, or with another, nothing is shown.
    for token in [None, Some("a-wrong-token-of-enough-length")] {
        for path in ["/metrics", "/", "/api/status"] {
            let (code, body) = http_get(http, path, token).await?;
            ensure!(code == 401, "{path} with {token:?}: {code} {body}");
            ensure!(!body.contains("tidepool_"), "{body}");
        }
    }
    let (code, before) = http_get(http, "/metrics", Some(TOKEN)).await?;
    ensure!(code == 200, "{code} {before}");
    let before = scrape(&before)?;
    ensure!(before["tidepool_results_accepted_total"] == 0.0);

    let bundle = echo_bundle(&dir.path().join("author"), &keys)?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let node = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    let inputs: Vec<Vec<u8>> = (0..40)
        .map(|i| format!("metric {i}").into_bytes())
        .collect();
    let (job, _) = client.submit(digest, inputs, "m".into()).await?;
    let s = wait_job(&client, job, Duration::from_secs(120)).await?;
    ensure!(s.done == 40, "{s:?}");
    // One observation serves a second: wait for a fresh one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, after) = http_get(http, "/metrics", Some(TOKEN)).await?;
    ensure!(code == 200);
    let text = after.clone();
    let after = scrape(&after)?;
    for (name, at_least) in [
        ("tidepool_results_accepted_total", 40.0),
        ("tidepool_tasks_submitted_total", 40.0),
        ("tidepool_leases_granted_total", 40.0),
        ("tidepool_task_latency_seconds_count", 40.0),
        ("tidepool_lease_wait_seconds_count", 40.0),
        ("tidepool_result_size_bytes_count", 40.0),
        ("tidepool_nodes_connected", 1.0),
        ("tidepool_tasks_done", 40.0),
    ] {
        let v = after.get(name).copied().unwrap_or(-1.0);
        ensure!(v >= at_least, "{name} = {v}, want >= {at_least}\n{text}");
    }
    // The sum of the result sizes is the bytes of the outputs stored.
    let bytes: usize = client
        .job_results(job)
        .await?
        .iter()
        .map(|r| record_output(r).len())
        .sum();
    ensure!(
        after["tidepool_result_size_bytes_sum"] == bytes as f64,
        "sum {} vs {bytes}",
        after["tidepool_result_size_bytes_sum"]
    );
    // Per-node families carry the node's key.
    ensure!(text.contains(&format!(
        "tidepool_node_running_tasks{{node=\"{}\"}}",
        node.key
    )));
    node.drain().await?;
    pool.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn health_goes_unhealthy_when_the_coordinator_stops() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(62);
    let pool = start_pool_with_http(dir.path(), &keys, test_pool_config(&keys), TOKEN).await?;
    let http = pool.http_addr.context("no http listener")?;
    for path in ["/healthz", "/readyz"] {
        let (code, body) = http_get(http, path, None).await?;
        ensure!(code == 200 && body == "ok\n", "{path}: {code} {body}");
    }
    // Only GET.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(http).await?;
        s.write_all(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        let mut r = String::new();
        s.read_to_string(&mut r).await?;
        ensure!(r.starts_with("HTTP/1.1 405"), "{r}");
    }
    pool.stop_coordinator();
    let mut last = (0, String::new());
    for _ in 0..50 {
        last = http_get(http, "/healthz", None).await?;
        if last.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(last.0 == 503, "{last:?}");
    ensure!(last.1.contains("coordinator"), "{last:?}");
    let (code, _) = http_get(http, "/metrics", Some(TOKEN)).await?;
    ensure!(code == 503, "/metrics with the coordinator stopped: {code}");
    pool.shutdown().await;
    Ok(())
}

/// A value of `attr` on the element with `id`, from a DOM dump.
fn attr_of(dom: &str, id: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let tag_start = dom[..at].rfind('<')?;
    let tag_end = at + dom[at..].find('>')?;
    let tag = &dom[tag_start..tag_end];
    let key = format!("{attr}=\"");
    let v = tag.find(&key)? + key.len();
    Some(tag[v..v + tag[v..].find('"')?].to_owned())
}

/// Every `data-NAME="..."` value in the DOM, in order.
fn data_values(dom: &str, name: &str) -> Vec<String> {
    let key = format!("data-{name}=\"");
    dom.match_indices(&key)
        .filter_map(|(i, _)| {
            let v = &dom[i + key.len()..];
            v.find('"').map(|e| v[..e].to_owned())
        })
        .collect()
}

#[tokio::test]
#[ignore = "slow: a real browser against a pool with three nodes (run by `cargo xtask test`)"]
async fn the_status_page_shows_the_pools_real_figures_in_a_browser() -> Result<()> {
    let chromium = std::path::Path::new("/usr/bin/chromium");
    ensure!(
        chromium.exists(),
        "{} is missing: `cargo xtask test` installs Debian's chromium",
        chromium.display()
    );
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(63);
    // A second client, so the two jobs share the pool (fair share across
    // clients) rather than run one after the other.
    let other = tidepool_proto::SecretKey::from_seed(tidepool_proto::KeyRole::Client, &[64; 32]);
    let mut cfg = test_pool_config(&keys);
    cfg.clients.insert(other.public());
    let pool = start_pool_with_http(&dir.path().join("pool"), &keys, cfg, TOKEN).await?;
    let http = pool.http_addr.context("no http listener")?;
    let bundle = echo_bundle(&dir.path().join("author"), &keys)?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let nodes: Vec<_> = (0..3)
        .map(|i| start_node(node_config(dir.path(), &keys, i, pool.addr)))
        .collect();
    // Two jobs large enough to be in flight while the browser looks.
    let inputs = |n: usize, tag: &str| -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("{tag} {i}").into_bytes()).collect()
    };
    let (big, _) = client
        .submit(digest, inputs(30_000, "big"), "big".into())
        .await?;
    let second =
        tidepool_client::PoolClient::connect(pool.addr, &other, keys.pool.public()).await?;
    let (small, _) = second
        .submit(digest, inputs(15_000, "small"), "small".into())
        .await?;
    // Both under way before the page is loaded.
    let mut under_way = false;
    for _ in 0..600 {
        let (a, b) = (
            client.job_status(big).await?,
            second.job_status(small).await?,
        );
        if a.done > 0 && b.done > 0 {
            under_way = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(under_way, "the two jobs did not both start");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let url = format!("http://{http}/?token={TOKEN}");
    let browser = |extra: &[String]| {
        let mut c = std::process::Command::new(chromium);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=7000",
        ])
        .args(extra)
        .arg(&url);
        c
    };
    let out = tokio::task::spawn_blocking({
        let mut c = browser(&["--dump-dom".into()]);
        move || c.output()
    })
    .await??;
    ensure!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8(out.stdout)?;

    // Live: the page fetched more than once.
    let updates: u32 = attr_of(&dom, "live", "data-updates")
        .context("no live marker")?
        .parse()?;
    ensure!(updates >= 2, "{updates} updates\n{dom}");
    ensure!(
        attr_of(&dom, "live", "class").as_deref() == Some("live"),
        "the page says it is not updating\n{dom}"
    );
    // The node table: the three nodes, each with results.
    let keys_shown = data_values(&dom, "key");
    let completed: Vec<u64> = data_values(&dom, "completed")
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    for n in &nodes {
        ensure!(
            keys_shown.contains(&n.key.to_string()),
            "node {} not shown",
            n.key
        );
    }
    ensure!(
        completed.len() == 3 && completed.iter().all(|c| *c > 0),
        "{completed:?}"
    );
    // The jobs: both, with the pool's task counts and progress no further
    // than the pool's now.
    let jobs_shown = data_values(&dom, "job");
    let done_shown = data_values(&dom, "done");
    let tasks_shown = data_values(&dom, "tasks");
    for (job, tasks, c) in [(big, 30_000u32, &client), (small, 15_000, &second)] {
        let i = jobs_shown
            .iter()
            .position(|j| *j == job.0.to_string())
            .with_context(|| format!("job {job} not shown"))?;
        let done: u32 = done_shown[i].parse()?;
        let now = c.job_status(job).await?;
        ensure!(
            !now.finished(),
            "job {job} finished before the page was read"
        );
        ensure!(tasks_shown[i] == tasks.to_string(), "{:?}", tasks_shown);
        ensure!(
            done > 0 && done <= now.done,
            "page {done}, pool {}",
            now.done
        );
    }
    // The plot: an hour of ten-second slots so far, with results in them.
    let points: usize = attr_of(&dom, "plot", "data-points")
        .context("no plot")?
        .parse()?;
    let peak: f64 = attr_of(&dom, "plot", "data-peak")
        .context("no plot peak")?
        .parse()?;
    ensure!(
        points >= 1 && peak > 0.0,
        "plot {points} points, peak {peak}"
    );

    // A screenshot for people.
    let shot = tidepool_tests::root().join("target/status-page.png");
    let out = tokio::task::spawn_blocking({
        let mut c = browser(&[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1500".into(),
            "--hide-scrollbars".into(),
        ]);
        move || c.output()
    })
    .await??;
    ensure!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        std::fs::metadata(&shot)?.len() > 10_000,
        "screenshot too small"
    );

    // Without the token the browser gets nothing of the pool.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
            .arg(format!("http://{http}/"))
            .output()
    })
    .await??;
    let dom = String::from_utf8(out.stdout)?;
    ensure!(!dom.contains("id=\"nodes\""), "{dom}");
    ensure!(dom.contains("needs its token"), "{dom}");
    for n in nodes {
        n.kill();
    }
    pool.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn silent_and_lingering_http_clients_are_let_go_and_bounded() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(65);
    // start_pool_with_http allows 8 connections at once.
    let pool = start_pool_with_http(dir.path(), &keys, test_pool_config(&keys), TOKEN).await?;
    let http = pool.http_addr.context("no http listener")?;
    // A client that asks for keep-alive gets one answer, then the end.
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .await?;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .context("a keep-alive connection was kept")??;
    ensure!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
    // Eight clients that connect and say nothing fill the listener ...
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(tokio::net::TcpStream::connect(http).await?);
    }
    let probe = tokio::spawn(async move { http_get(http, "/healthz", None).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        !probe.is_finished(),
        "a ninth connection was served past the limit"
    );
    // ... until the head timeout lets them go; then the next is served.
    for mut s in silent {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
            .await
            .context("a silent connection was kept open")??;
        ensure!(
            n == 0 || String::from_utf8_lossy(&buf).contains("408"),
            "{buf:?}"
        );
    }
    let (code, body) = tokio::time::timeout(Duration::from_secs(30), probe)
        .await
        .context("the waiting client was never served")???;
    ensure!(code == 200, "{code} {body}");
    pool.shutdown().await;
    Ok(())
}
