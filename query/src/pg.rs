//! SQL for analysts over the Postgres wire protocol (`psql`, Grafana, Metabase, any driver),
//! served by `datafusion-postgres` on the same DataFusion sessions as `beacon sql`.
//!
//! Who you are decides what you see, in the plan, not by trusting the query text:
//! - user `<merchant id>`, password `<read token>` of that merchant: a session built by
//!   [`Warehouse::merchant_session`], whose every table is a view filtered on the merchant,
//!   so joins, subqueries and `information_schema` only ever reach that merchant's rows;
//! - user `<admin token name>`, password `<admin token secret>`: every row.
//!
//! Every session is read-only: only queries (`SELECT`, `EXPLAIN`, `SHOW`) and transaction
//! no-ops run; `CREATE [EXTERNAL] TABLE`, `COPY`, `SET` of DataFusion options and the like
//! are refused with SQLSTATE 42501 (an external table would read server files). The password
//! arrives in cleartext, as with the HTTP API's bearer tokens: serve it on loopback or behind
//! TLS termination.

use std::fmt::Debug;
use std::sync::{Arc, OnceLock};

use async_nats::jetstream::kv;
use async_trait::async_trait;
use beacon_warehouse::Warehouse;
use datafusion::common::ParamValues;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatementAst;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::pgwire;
use datafusion_postgres::{DfSessionService, Parser, QueryHook};
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    finish_authentication, protocol_negotiation, save_startup_parameters_to_metadata,
    DefaultServerParameterProvider, LoginInfo, StartupHandler,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, Response};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers,
    PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

/// Checks an admin login: `(user, password) -> allowed`.
pub type AdminCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// What every connection shares.
pub struct SqlServer {
    warehouse: Arc<Warehouse>,
    merchants: kv::Store,
    admin: AdminCheck,
}

/// The statement type `DfSessionService` uses (its cursor hook downcasts to it).
type DfStatement = (String, Option<(Statement, LogicalPlan)>);

fn error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

impl SqlServer {
    pub fn new(warehouse: Arc<Warehouse>, merchants: kv::Store, admin: AdminCheck) -> Arc<Self> {
        Arc::new(Self {
            warehouse,
            merchants,
            admin,
        })
    }

    /// Serves connections from `listener` until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            let (socket, peer) = tokio::select! {
                accepted = listener.accept() => accepted?,
                _ = &mut shutdown => return Ok(()),
            };
            let connection = Arc::new(Connection {
                server: self.clone(),
                session: Arc::new(OnceLock::new()),
            });
            tokio::spawn(async move {
                if let Err(e) = pgwire::tokio::process_socket(socket, None, connection).await {
                    tracing::debug!(%peer, error = %e, "SQL connection ended");
                }
            });
        }
    }

    /// The session for a login, or `None` if the credentials are wrong.
    async fn login(&self, user: &str, password: &str) -> PgWireResult<Option<SessionContext>> {
        let failed = |e: String| error("58000", format!("login check failed: {e}"));
        let ctx = if (self.admin)(user, password) {
            self.warehouse
                .serving_session()
                .await
                .map_err(|e| failed(e.to_string()))?
        } else {
            let owner = crate::tokens::merchant_for(&self.merchants, password)
                .await
                .map_err(|e| failed(e.to_string()))?;
            if owner.as_deref() != Some(user) {
                return Ok(None);
            }
            self.warehouse
                .merchant_session(user)
                .await
                .map_err(|e| failed(e.to_string()))?
        };
        // psql's \d and BI tools read pg_catalog; it lists this session's tables only.
        setup_pg_catalog(&ctx, beacon_warehouse::CATALOG_NAME, EmptyContextProvider)
            .map_err(|e| failed(e.to_string()))?;
        Ok(Some(ctx))
    }
}

/// One client connection: the session is set once the login succeeds.
struct Connection {
    server: Arc<SqlServer>,
    session: Arc<OnceLock<Arc<DfSessionService>>>,
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::new(Queries {
            session: self.session.clone(),
        })
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::new(Queries {
            session: self.session.clone(),
        })
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(Login {
            server: self.server.clone(),
            session: self.session.clone(),
        })
    }
}

/// Cleartext password login checked against read tokens and admin tokens (pgwire's own
/// cleartext handler compares with a stored password; we only store token hashes).
struct Login {
    server: Arc<SqlServer>,
    session: Arc<OnceLock<Arc<DfSessionService>>>,
}

#[async_trait]
impl StartupHandler for Login {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                let user = LoginInfo::from_client_info(client)
                    .user()
                    .unwrap_or_default()
                    .to_string();
                let Some(ctx) = self.server.login(&user, &pwd.password).await? else {
                    tracing::info!(%user, "SQL login refused");
                    return Err(PgWireError::InvalidPassword(user));
                };
                let service = DfSessionService::new_with_hooks(
                    Arc::new(ctx),
                    vec![
                        Arc::new(ReadOnly) as Arc<dyn QueryHook>,
                        Arc::new(CursorStatementHook),
                        Arc::new(SetShowHook),
                        Arc::new(TransactionStatementHook),
                    ],
                );
                let _ = self.session.set(Arc::new(service));
                let (pid, secret) = RandomPidSecretKeyGenerator::default().generate(client);
                client.set_pid_and_secret_key(pid, secret);
                finish_authentication(client, &DefaultServerParameterProvider::default()).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Runs queries in the connection's session.
struct Queries {
    session: Arc<OnceLock<Arc<DfSessionService>>>,
}

impl Queries {
    fn service(&self) -> PgWireResult<Arc<DfSessionService>> {
        self.session
            .get()
            .cloned()
            .ok_or_else(|| error("28000", "not logged in"))
    }
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let service = self.service()?;
        SimpleQueryHandler::do_query(&*service, client, query).await
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = DfStatement;
    type QueryParser = SessionParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        Arc::new(SessionParser {
            session: self.session.clone(),
        })
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let service = self.service()?;
        ExtendedQueryHandler::do_query(&*service, client, portal, max_rows).await
    }
}

/// Parses with the connection's session (its tables and views).
struct SessionParser {
    session: Arc<OnceLock<Arc<DfSessionService>>>,
}

impl SessionParser {
    fn parser(&self) -> PgWireResult<Arc<Parser>> {
        let service = self
            .session
            .get()
            .ok_or_else(|| error("28000", "not logged in"))?;
        Ok(ExtendedQueryHandler::query_parser(&**service))
    }
}

#[async_trait]
impl QueryParser for SessionParser {
    type Statement = DfStatement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Self::Statement>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        self.parser()?.parse_sql(client, sql, types).await
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        self.parser()?.get_parameter_types(stmt)
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        self.parser()?.get_result_schema(stmt, column_format)
    }
}

/// Lets only read-only statements through (see the module docs).
struct ReadOnly;

async fn check(stmt: &Statement, ctx: &SessionContext) -> PgWireResult<Option<LogicalPlan>> {
    match stmt {
        Statement::Query(_) | Statement::Explain { .. } => {
            let api = |e: datafusion::error::DataFusionError| PgWireError::ApiError(Box::new(e));
            let plan = ctx
                .state()
                .statement_to_plan(DfStatementAst::Statement(Box::new(stmt.clone())))
                .await
                .map_err(api)?;
            SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false)
                .verify_plan(&plan)
                .map_err(api)?;
            Ok(Some(plan))
        }
        Statement::ShowVariable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. } => Ok(None),
        other => Err(error(
            "42501",
            format!(
                "read-only: `{}` is not allowed (queries only)",
                other.to_string().chars().take(60).collect::<String>()
            ),
        )),
    }
}

#[async_trait]
impl QueryHook for ReadOnly {
    async fn handle_simple_query(
        &self,
        stmt: &Statement,
        ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        check(stmt, ctx).await.err().map(Err)
    }

    async fn handle_extended_parse_query(
        &self,
        stmt: &Statement,
        ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        match check(stmt, ctx).await {
            Ok(Some(plan)) => Some(Ok(plan)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    async fn handle_extended_query(
        &self,
        _stmt: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        None // checked when parsed
    }
}
