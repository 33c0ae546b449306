//! The gRPC services: thin handlers that call the `Controller`.

use std::pin::Pin;
use std::sync::Arc;

use cohort_proto::agent_service_server::AgentService;
use cohort_proto::job_service_server::JobService;
use cohort_proto::{
    AgentMessage, CancelJobRequest, ControllerMessage, DeleteJobRequest, DeleteJobResponse, DoctorRequest,
    DoctorResponse, GetJobRequest, GetMetricsRequest, Job, JobEvent, JobLogLine, JobState, ListJobsRequest,
    ListJobsResponse, ListNodesRequest, ListNodesResponse, PlanJobRequest, PlanJobResponse, RegisterRequest,
    RegisterResponse, ResumeJobRequest, StreamLogsRequest, SubmitJobRequest, SubmitJobResponse, TrainingPoint,
    WatchJobRequest, agent_message::Msg,
};
use cohort_proto::{ClearGpuRequest, GetLeaderRequest, LeaderInfo, Node, NodeRequest};
use cohort_proto::{
    ConversionCacheEntry, GetReportRequest, ListConversionCacheRequest, ListConversionCacheResponse, PipelineReport,
    RemoveConversionCacheRequest,
};
use cohort_proto::{
    DeleteQueueRequest, DeleteQueueResponse, GetUsageRequest, GetUsageResponse, ListQueuesRequest, ListQueuesResponse,
    QueueSpec, QueueStatus,
};
use cohort_proto::{EvictNodeCacheRequest, ListNodeCachesRequest, ListNodeCachesResponse, NodeCache};
use cohort_proto::{FetchSyncRequest, SyncArchive, SyncChunk};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::controller::Controller;
use crate::leading::{Leading, Target};
use crate::logs::LogReader;
use crate::secrets::redact_job;

/// A job as the job API shows it: secret env values hidden.
fn redacted(mut job: Job) -> Job {
    redact_job(&mut job);
    job
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The job and agent APIs as the leader serves them, on its `Controller`.
#[derive(Clone)]
pub struct Local {
    pub controller: Arc<Controller>,
    pub leading: Arc<Leading>,
}

/// What the gRPC server runs: the leader's `Local` when this process leads;
/// otherwise the job API is forwarded to the leader and agents are told
/// where it is.
#[derive(Clone)]
pub struct Api {
    pub leading: Arc<Leading>,
}

impl Api {
    fn leader_info(&self) -> LeaderInfo {
        leader_info(&self.leading)
    }
}

fn leader_info(leading: &Leading) -> LeaderInfo {
    let state = leading.state();
    LeaderInfo {
        controller_id: leading.id.clone(),
        is_leader: state.is_leader,
        leader_url: state.leader_url,
        leader_id: state.leader_id,
    }
}

/// A unary job-API call: served here when leading, else by the leader.
macro_rules! unary {
    ($self:ident, $request:ident, $method:ident) => {
        match $self.leading.target().await? {
            Target::Local(controller) => Local { controller, leading: $self.leading.clone() }.$method($request).await,
            Target::Leader(mut leader) => leader.$method(crate::security::auth::forward($request)).await,
        }
    };
}

/// A server-streaming job-API call, likewise.
macro_rules! streaming {
    ($self:ident, $request:ident, $method:ident) => {
        match $self.leading.target().await? {
            Target::Local(controller) => Local { controller, leading: $self.leading.clone() }.$method($request).await,
            Target::Leader(mut leader) => {
                let stream = leader.$method(crate::security::auth::forward($request)).await?.into_inner();
                Ok(Response::new(Box::pin(stream) as BoxStream<_>))
            }
        }
    };
}

#[tonic::async_trait]
impl AgentService for Api {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let node = request.get_ref().node.as_ref().map(|n| n.name.as_str()).unwrap_or_default();
        crate::security::auth::caller(&request).check_node(node)?;
        let fingerprint = request.extensions().get::<crate::security::auth::PeerFingerprint>().cloned();
        let controller = self.leading.for_agents().await?;
        if let Some(fingerprint) = fingerprint {
            controller.check_node_certificate(node, &fingerprint.0).await?;
        }
        let mut response = Local { controller, leading: self.leading.clone() }.register(request).await?;
        response.get_mut().controller_id = self.leading.id.clone();
        Ok(response)
    }

    type SessionStream = BoxStream<ControllerMessage>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let controller = self.leading.for_agents().await?;
        Local { controller, leading: self.leading.clone() }.session(request).await
    }

    type FetchSyncStream = BoxStream<SyncChunk>;

    async fn fetch_sync(&self, request: Request<FetchSyncRequest>) -> Result<Response<Self::FetchSyncStream>, Status> {
        let controller = self.leading.for_agents().await?;
        Local { controller, leading: self.leading.clone() }.fetch_sync(request).await
    }
}

#[tonic::async_trait]
impl JobService for Api {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        unary!(self, request, submit_job)
    }
    async fn plan_job(&self, request: Request<PlanJobRequest>) -> Result<Response<PlanJobResponse>, Status> {
        unary!(self, request, plan_job)
    }
    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        unary!(self, request, get_job)
    }
    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        unary!(self, request, list_jobs)
    }
    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        unary!(self, request, cancel_job)
    }
    async fn delete_job(&self, request: Request<DeleteJobRequest>) -> Result<Response<DeleteJobResponse>, Status> {
        unary!(self, request, delete_job)
    }
    type WatchJobStream = BoxStream<JobEvent>;
    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        streaming!(self, request, watch_job)
    }
    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        unary!(self, request, list_nodes)
    }
    type StreamLogsStream = BoxStream<JobLogLine>;
    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        streaming!(self, request, stream_logs)
    }
    type GetMetricsStream = BoxStream<TrainingPoint>;
    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<Self::GetMetricsStream>, Status> {
        streaming!(self, request, get_metrics)
    }
    async fn resume_job(&self, request: Request<ResumeJobRequest>) -> Result<Response<Job>, Status> {
        unary!(self, request, resume_job)
    }
    async fn doctor(&self, request: Request<DoctorRequest>) -> Result<Response<DoctorResponse>, Status> {
        unary!(self, request, doctor)
    }
    async fn cordon_node(&self, request: Request<NodeRequest>) -> Result<Response<Node>, Status> {
        unary!(self, request, cordon_node)
    }
    async fn drain_node(&self, request: Request<NodeRequest>) -> Result<Response<Node>, Status> {
        unary!(self, request, drain_node)
    }
    async fn uncordon_node(&self, request: Request<NodeRequest>) -> Result<Response<Node>, Status> {
        unary!(self, request, uncordon_node)
    }
    async fn clear_gpu(&self, request: Request<ClearGpuRequest>) -> Result<Response<Node>, Status> {
        unary!(self, request, clear_gpu)
    }
    /// Every controller answers this itself: agents and the CLI use it to find the leader.
    async fn get_leader(&self, _: Request<GetLeaderRequest>) -> Result<Response<LeaderInfo>, Status> {
        Ok(Response::new(self.leader_info()))
    }
    async fn get_report(&self, request: Request<GetReportRequest>) -> Result<Response<PipelineReport>, Status> {
        unary!(self, request, get_report)
    }
    async fn list_conversion_cache(
        &self,
        request: Request<ListConversionCacheRequest>,
    ) -> Result<Response<ListConversionCacheResponse>, Status> {
        unary!(self, request, list_conversion_cache)
    }
    async fn remove_conversion_cache(
        &self,
        request: Request<RemoveConversionCacheRequest>,
    ) -> Result<Response<ConversionCacheEntry>, Status> {
        unary!(self, request, remove_conversion_cache)
    }
    async fn list_queues(&self, request: Request<ListQueuesRequest>) -> Result<Response<ListQueuesResponse>, Status> {
        unary!(self, request, list_queues)
    }
    async fn set_queue(&self, request: Request<QueueSpec>) -> Result<Response<QueueStatus>, Status> {
        unary!(self, request, set_queue)
    }
    async fn delete_queue(
        &self,
        request: Request<DeleteQueueRequest>,
    ) -> Result<Response<DeleteQueueResponse>, Status> {
        unary!(self, request, delete_queue)
    }
    async fn get_usage(&self, request: Request<GetUsageRequest>) -> Result<Response<GetUsageResponse>, Status> {
        unary!(self, request, get_usage)
    }
    async fn list_node_caches(
        &self,
        request: Request<ListNodeCachesRequest>,
    ) -> Result<Response<ListNodeCachesResponse>, Status> {
        unary!(self, request, list_node_caches)
    }
    async fn evict_node_cache(&self, request: Request<EvictNodeCacheRequest>) -> Result<Response<NodeCache>, Status> {
        unary!(self, request, evict_node_cache)
    }
    async fn upload_sync(&self, request: Request<Streaming<SyncChunk>>) -> Result<Response<SyncArchive>, Status> {
        match self.leading.target().await? {
            Target::Local(controller) => Local { controller, leading: self.leading.clone() }.upload_sync(request).await,
            Target::Leader(mut leader) => {
                // A broken upload ends the forwarded stream: the leader finds it short of its declared size.
                let forwarded = crate::security::auth::forward(request)
                    .map(|chunks| chunks.take_while(Result::is_ok).filter_map(Result::ok));
                leader.upload_sync(forwarded).await
            }
        }
    }
}

/// Agent messages read but not yet applied, per session; past it the reader
/// waits (and the agent's stream with it).
const SESSION_BACKLOG: usize = 256;

fn finished(job: &Job) -> bool {
    matches!(JobState::try_from(job.state), Ok(JobState::Succeeded | JobState::Failed | JobState::Cancelled))
        && job.live_processes == 0
}

#[tonic::async_trait]
impl AgentService for Local {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(self.controller.register(request.into_inner()).await?))
    }

    type SessionStream = BoxStream<ControllerMessage>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = crate::security::auth::caller(&request);
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(AgentMessage { msg: Some(Msg::Hello(hello)) }) => hello,
            _ => return Err(Status::invalid_argument("the first message of a session must be Hello")),
        };
        caller.check_node(&hello.node_name)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let session = tx.downgrade();
        self.controller.attach(&hello.node_name, &hello.session_id, tx).await?;
        tracing::info!(node = %hello.node_name, "agent session open");
        let (learner, node) = (self.controller.clone(), hello.node_name.clone());
        tokio::spawn(async move { learner.learn_holdings(&node).await });
        let controller = self.controller.clone();
        // The session's messages are applied in order by one task; the reader
        // acks each heartbeat as it arrives, never behind a message waiting
        // for the state.
        let (work, mut queued) = mpsc::channel::<Option<Msg>>(SESSION_BACKLOG);
        let node = hello.node_name.clone();
        let apply = tokio::spawn(async move {
            while let Some(msg) = queued.recv().await {
                match msg {
                    Some(Msg::Heartbeat(hb)) => controller.heartbeat(&node, hb).await,
                    Some(Msg::ProcessEvent(ev)) => controller.process_event(&node, ev).await,
                    Some(Msg::Ack(ack)) => controller.command_ack(&node, ack).await,
                    Some(Msg::Logs(batch)) if batch.fetch_command_id != 0 => {
                        controller.fetched_lines(&node, batch).await;
                    }
                    Some(Msg::Logs(batch)) => {
                        let rank = controller.output_seen(&batch.job_id, batch.attempt, &node).await;
                        let gaps: Vec<(u64, String)> = batch
                            .lines
                            .iter()
                            .filter(|l| l.dropped_bytes > 0)
                            .map(|l| (l.dropped_bytes, l.text.clone()))
                            .collect();
                        controller.logs.append(&batch.job_id, &node, rank, batch.attempt, batch.lines).await;
                        for (bytes, text) in gaps {
                            controller.output_dropped(&batch.job_id, batch.attempt, bytes, &text).await;
                        }
                    }
                    Some(Msg::Metrics(batch)) => controller.metrics(batch).await,
                    Some(Msg::Preflight(report)) => controller.node_preflight(&node, report).await,
                    Some(Msg::PrepareResult(result)) => controller.prepare_result(&node, result).await,
                    Some(Msg::StageProgress(progress)) => controller.stage_progress(&node, progress).await,
                    Some(Msg::QueryResult(result)) => controller.query_result(result).await,
                    Some(Msg::GpuEvent(event)) => controller.gpu_event(&node, event).await,
                    Some(Msg::StackDump(dump)) => controller.stack_dump(&node, dump).await,
                    Some(Msg::Hello(_)) | None => {
                        tracing::warn!(node = %node, "ignoring an unexpected or empty agent message");
                    }
                }
            }
        });
        let controller = self.controller.clone();
        tokio::spawn(async move {
            let node = hello.node_name;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::warn!(node = %node, %status, "agent stream broke");
                        break;
                    }
                };
                if let Some(Msg::Heartbeat(hb)) = &msg.msg {
                    Controller::ack_heartbeat(&session, hb.seq);
                }
                if work.send(msg.msg).await.is_err() {
                    break;
                }
            }
            drop(work);
            let _ = apply.await;
            controller.detach(&node, &hello.session_id).await;
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    type FetchSyncStream = BoxStream<SyncChunk>;

    async fn fetch_sync(&self, request: Request<FetchSyncRequest>) -> Result<Response<Self::FetchSyncStream>, Status> {
        let node = crate::security::auth::caller(&request).node().map(str::to_owned);
        let request = request.into_inner();
        let user = self.controller.sync_owner(&request.job_id, node, &request.sha256).await?;
        let chunks = self.controller.syncs.send(&user, &request.sha256).await?;
        Ok(Response::new(Box::pin(chunks)))
    }
}

#[tonic::async_trait]
impl JobService for Local {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        let caller = crate::security::auth::caller(&request);
        let request = request.into_inner();
        let mut file = request.file.ok_or_else(|| Status::invalid_argument("SubmitJobRequest.file is required"))?;
        file.submitted_by = caller.submitter();
        file.default_user = self.controller.config.run_as.default_user_for(&caller);
        let options = crate::controller::admission::SubmitOptions {
            request_id: request.request_id,
            max_priority: caller.priority_capped().then_some(self.controller.config.admission.max_submit_priority),
            run_as_bound: caller.run_as_bound().map(str::to_owned),
        };
        let (mut job, warnings) = self.controller.submit(file, options).await?;
        redact_job(&mut job);
        Ok(Response::new(SubmitJobResponse { job: Some(job), warnings }))
    }

    async fn plan_job(&self, request: Request<PlanJobRequest>) -> Result<Response<PlanJobResponse>, Status> {
        let caller = crate::security::auth::caller(&request);
        let request = request.into_inner();
        let mut file = request.file.ok_or_else(|| Status::invalid_argument("PlanJobRequest.file is required"))?;
        // `plan --check` runs ms-swift on the nodes as the user the job would run as.
        file.default_user = self.controller.config.run_as.default_user_for(&caller);
        Ok(Response::new(self.controller.plan(file, request.check).await))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(redacted(self.controller.get(&request.into_inner().job).await?)))
    }

    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let jobs = self.controller.list(request.into_inner().active_only).await.into_iter().map(redacted).collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let caller = crate::security::auth::caller(&request);
        let job = request.into_inner().job;
        crate::security::auth::check_owner(&caller, &self.controller.cancel_target(&job).await?, "cancel")?;
        Ok(Response::new(redacted(self.controller.cancel(&job).await?)))
    }

    async fn delete_job(&self, request: Request<DeleteJobRequest>) -> Result<Response<DeleteJobResponse>, Status> {
        let caller = crate::security::auth::caller(&request);
        let jobs = request.into_inner().jobs;
        if jobs.is_empty() {
            return Err(Status::invalid_argument("name at least one job to delete"));
        }
        for job in &jobs {
            crate::security::auth::check_owner(&caller, &self.controller.cancel_target(job).await?, "delete")?;
        }
        Ok(Response::new(DeleteJobResponse { deleted: self.controller.delete(jobs).await? }))
    }

    type WatchJobStream = BoxStream<JobEvent>;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let (job, mut rx) = self.controller.watch(&request.into_inner().job).await?;
        let controller = self.controller.clone();
        let stream = async_stream(move |tx| async move {
            let id = job.id.clone();
            let done = finished(&job);
            let first = JobEvent {
                unix_ms: cohort_proto::now_unix_ms(),
                job: Some(redacted(job)),
                message: "current state".into(),
            };
            if tx.send(Ok(first)).await.is_err() || done {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(mut ev) if ev.job.as_ref().is_some_and(|j| j.id == id) => {
                        let done = ev.job.as_ref().is_some_and(finished);
                        ev.job.iter_mut().for_each(redact_job);
                        if tx.send(Ok(ev)).await.is_err() || done {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Missed events: send the current state instead.
                        let Ok(job) = controller.get(&id).await else { return };
                        let done = finished(&job);
                        let ev = JobEvent {
                            unix_ms: cohort_proto::now_unix_ms(),
                            job: Some(redacted(job)),
                            message: "resync".into(),
                        };
                        if tx.send(Ok(ev)).await.is_err() || done {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn list_nodes(&self, _: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        Ok(Response::new(ListNodesResponse { nodes: self.controller.nodes().await }))
    }

    type GetMetricsStream = BoxStream<TrainingPoint>;

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<Self::GetMetricsStream>, Status> {
        Ok(Response::new(self.metrics_stream(request.into_inner()).await?))
    }

    async fn resume_job(&self, request: Request<ResumeJobRequest>) -> Result<Response<Job>, Status> {
        let caller = crate::security::auth::caller(&request);
        let job = request.into_inner().job;
        crate::security::auth::check_owner(&caller, &self.controller.get(&job).await?, "resume")?;
        Ok(Response::new(redacted(self.controller.resume(&job).await?)))
    }

    async fn doctor(&self, _: Request<DoctorRequest>) -> Result<Response<DoctorResponse>, Status> {
        Ok(Response::new(DoctorResponse { table: Some(self.controller.doctor().await) }))
    }

    async fn cordon_node(&self, request: Request<NodeRequest>) -> Result<Response<Node>, Status> {
        Ok(Response::new(self.controller.set_schedulable(&request.into_inner().node, true, false).await?))
    }

    async fn drain_node(&self, request: Request<NodeRequest>) -> Result<Response<Node>, Status> {
        Ok(Response::new(self.controller.set_schedulable(&request.into_inner().node, true, true).await?))
    }

    async fn uncordon_node(&self, request: Request<NodeRequest>) -> Result<Response<Node>, Status> {
        Ok(Response::new(self.controller.set_schedulable(&request.into_inner().node, false, false).await?))
    }

    async fn clear_gpu(&self, request: Request<ClearGpuRequest>) -> Result<Response<Node>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.controller.clear_gpu(&req.node, req.gpu_index).await?))
    }

    async fn get_leader(&self, _: Request<GetLeaderRequest>) -> Result<Response<LeaderInfo>, Status> {
        Ok(Response::new(leader_info(&self.leading)))
    }

    async fn get_report(&self, request: Request<GetReportRequest>) -> Result<Response<PipelineReport>, Status> {
        Ok(Response::new(self.controller.report(&request.into_inner().job).await?))
    }

    async fn list_conversion_cache(
        &self,
        _: Request<ListConversionCacheRequest>,
    ) -> Result<Response<ListConversionCacheResponse>, Status> {
        Ok(Response::new(ListConversionCacheResponse { entries: self.controller.conversion_cache().await? }))
    }

    async fn remove_conversion_cache(
        &self,
        request: Request<RemoveConversionCacheRequest>,
    ) -> Result<Response<ConversionCacheEntry>, Status> {
        Ok(Response::new(self.controller.remove_conversion(&request.into_inner().key).await?))
    }

    async fn list_queues(&self, _: Request<ListQueuesRequest>) -> Result<Response<ListQueuesResponse>, Status> {
        Ok(Response::new(self.controller.list_queues().await))
    }

    async fn set_queue(&self, request: Request<QueueSpec>) -> Result<Response<QueueStatus>, Status> {
        Ok(Response::new(self.controller.set_queue(request.into_inner()).await?))
    }

    async fn delete_queue(
        &self,
        request: Request<DeleteQueueRequest>,
    ) -> Result<Response<DeleteQueueResponse>, Status> {
        let spec = self.controller.delete_queue(&request.into_inner().name).await?;
        Ok(Response::new(DeleteQueueResponse { spec: Some(spec) }))
    }

    async fn get_usage(&self, request: Request<GetUsageRequest>) -> Result<Response<GetUsageResponse>, Status> {
        Ok(Response::new(self.controller.usage(request.into_inner().since_unix_ms).await))
    }

    async fn list_node_caches(
        &self,
        request: Request<ListNodeCachesRequest>,
    ) -> Result<Response<ListNodeCachesResponse>, Status> {
        let nodes = self.controller.node_caches(&request.into_inner().node).await?;
        Ok(Response::new(ListNodeCachesResponse { nodes }))
    }

    async fn evict_node_cache(&self, request: Request<EvictNodeCacheRequest>) -> Result<Response<NodeCache>, Status> {
        let request = request.into_inner();
        Ok(Response::new(self.controller.evict_node_cache(&request.node, request.sha256).await?))
    }

    async fn upload_sync(&self, request: Request<Streaming<SyncChunk>>) -> Result<Response<SyncArchive>, Status> {
        let user = crate::security::auth::caller(&request).submitter();
        let archive = self.controller.syncs.receive(&user, request.into_inner()).await?;
        self.controller.collect_syncs().await;
        Ok(Response::new(archive))
    }

    type StreamLogsStream = BoxStream<JobLogLine>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let req = request.into_inner();
        self.controller.ensure_log_history(&req.job).await;
        let (job, mut events) = self.controller.watch(&req.job).await?;
        let id = job.id.clone();
        let mut reader = self.controller.logs.reader(&id).await;
        let controller = self.controller.clone();
        let node = req.node.clone();
        let keep = move |l: &JobLogLine| node.is_empty() || l.node_name == node;
        let stream = async_stream(move |tx| async move {
            // History and later records are read from the file by range, a chunk at a time.
            let mut offset = match req.tail {
                0 => 0,
                n => reader.tail_start(n, keep.clone()).await,
            };
            let end = reader.end;
            if !send_range(&tx, &reader, &mut offset, end, &keep).await || !req.follow || finished(&job) {
                return;
            }
            loop {
                let end = tokio::select! {
                    woken = reader.appended.recv() => match woken {
                        Ok(appended) if *appended.job_id == *id => appended.end,
                        Ok(_) => continue,
                        // Missed wake-ups: read on to where the file ends now.
                        Err(broadcast::error::RecvError::Lagged(_)) => controller.logs.end(&id).await,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    ev = events.recv() => {
                        let done = match ev {
                            Ok(ev) => ev.job.as_ref().is_some_and(|j| j.id == id && finished(j)),
                            Err(broadcast::error::RecvError::Lagged(_)) => controller.get(&id).await.map(|j| finished(&j)).unwrap_or(true),
                            Err(broadcast::error::RecvError::Closed) => true,
                        };
                        if done {
                            // Lines always arrive before the exit that ends the job: drain them.
                            let end = controller.logs.end(&id).await;
                            send_range(&tx, &reader, &mut offset, end, &keep).await;
                            return;
                        }
                        continue;
                    }
                };
                if !send_range(&tx, &reader, &mut offset, end, &keep).await {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

#[tonic::async_trait]
trait MetricsApi {
    async fn metrics_stream(&self, req: GetMetricsRequest) -> Result<BoxStream<TrainingPoint>, Status>;
}

#[tonic::async_trait]
impl MetricsApi for Local {
    async fn metrics_stream(&self, req: GetMetricsRequest) -> Result<BoxStream<TrainingPoint>, Status> {
        let (job, mut events) = self.controller.watch(&req.job).await?;
        let id = job.id.clone();
        let (history, mut points) = self.controller.metrics.snapshot(&id, 0).await;
        let controller = self.controller.clone();
        Ok(async_stream(move |tx| async move {
            let mut next = history.len();
            for point in history {
                if tx.send(Ok(point)).await.is_err() {
                    return;
                }
            }
            if !req.follow || finished(&job) {
                return;
            }
            loop {
                tokio::select! {
                    point = points.recv() => match point {
                        Ok(tagged) if *tagged.job_id == *id && tagged.index >= next => {
                            next = tagged.index + 1;
                            if tx.send(Ok(tagged.point)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let (missed, rx) = controller.metrics.snapshot(&id, next).await;
                            points = rx;
                            next += missed.len();
                            for point in missed {
                                if tx.send(Ok(point)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    ev = events.recv() => {
                        let done = match ev {
                            Ok(ev) => ev.job.as_ref().is_some_and(|j| j.id == id && finished(j)),
                            Err(broadcast::error::RecvError::Lagged(_)) => false,
                            Err(broadcast::error::RecvError::Closed) => true,
                        };
                        if done {
                            let (rest, _) = controller.metrics.snapshot(&id, next).await;
                            for point in rest {
                                if tx.send(Ok(point)).await.is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                    }
                }
            }
        }))
    }
}

/// A response stream fed by a spawned task; the task ends when the client goes away.
/// Sends the job's lines in `[offset, end)` that `keep` keeps, reading the file a
/// chunk at a time; `offset` moves on. False when the client has gone.
async fn send_range(
    tx: &mpsc::Sender<Result<JobLogLine, Status>>,
    reader: &LogReader,
    offset: &mut u64,
    end: u64,
    keep: &impl Fn(&JobLogLine) -> bool,
) -> bool {
    while *offset < end {
        let (lines, next) = reader.chunk(*offset, end).await;
        *offset = next;
        for line in lines.into_iter().filter(|l| keep(l)) {
            if tx.send(Ok(line)).await.is_err() {
                return false;
            }
        }
    }
    true
}

fn async_stream<T, F, Fut>(body: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(|x| x))
}
