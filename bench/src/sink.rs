//! `--otlp-sink`: an OTLP/gRPC trace receiver that only counts spans, for
//! measuring the gateway with trace export on.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Clone, Default)]
struct Count(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Count {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        let total = self.0.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        eprintln!("otlp sink: {total} spans");
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

pub async fn run(port: u16) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Count::default()))
        .serve(([127, 0, 0, 1], port).into())
        .await?;
    Ok(())
}
