//! `tidepool job challenge TASK`: dispute a result; the pool re-executes the
//! task on another node and records the outcome in the task's record.

use super::common::PoolArgs;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// The task id (from `tidepool job results`).
    task: tidepool_proto::wire::TaskId,
    /// Wait until the re-execution has decided.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    pool: PoolArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(a: Args) -> anyhow::Result<()> {
    let wait = a.wait;
    let (c, record) = a.pool.call(|client| async move {
        let c = client.challenge(a.task).await?;
        let mut record = client.task_record(c.job, c.index).await?;
        while wait && record.challenge == Some(tidepool_proto::wire::ChallengeState::Pending) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            record = client.task_record(c.job, c.index).await?;
        }
        Ok((c, record))
    })?;
    let state = record.challenge.unwrap_or(c.state);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "task": a.task, "checked": c.target, "job": c.job, "index": c.index,
                "challenge": state.as_str(), "verification": record.verification,
                "node": record.node.map(|k| k.to_string()),
            })
        );
    } else {
        let of = if c.target == a.task {
            String::new()
        } else {
            format!(" (the cached result of task {})", c.target)
        };
        println!("task {}{of}: challenge {state}", a.task);
    }
    Ok(())
}
