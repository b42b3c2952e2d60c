//! Observability: the agent's status model ([`status::AgentStatus`], rendered as JSON,
//! Prometheus text and a table) and the health server (/healthz, /readyz, /status,
//! /metrics).

pub mod health;
pub mod status;
