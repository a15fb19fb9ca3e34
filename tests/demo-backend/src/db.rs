//! Postgres: connecting (with retry), the request pool, the schema and the seed data.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::platform::Platform;

const RETRY_DELAY: Duration = Duration::from_millis(500);
/// Per-attempt connect timeout, unless the URL sets `connect_timeout`.
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request waits for a free pooled connection before answering 503.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bump to re-seed a database seeded by an older layout.
const SEED_VERSION: i32 = 1;
/// Key of the advisory lock that serialises schema setup between concurrent instances.
const SETUP_LOCK_KEY: i64 = 0x5e1f_4ea1_0000_0001;
/// Password of every seeded user.
pub(crate) const SEED_PASSWORD: &str = "demo1234";

/// Parses `--database-url` (`postgres://user:pw@host:port/db` or `key=value` form).
pub(crate) fn parse_database_url(url: &str) -> Result<Config, String> {
    let mut config: Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| format!("invalid database URL: {}", error_chain(&e)))?;
    if config.get_hosts().is_empty() {
        return Err("invalid database URL: no host given".into());
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_ATTEMPT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("demo-backend");
    }
    Ok(config)
}

/// `host:port/dbname as user`, for log lines (never shows the password).
pub(crate) fn describe(config: &Config) -> String {
    let mut out = String::new();
    for (i, host) in config.get_hosts().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match host {
            Host::Tcp(h) => out.push_str(h),
            #[cfg(unix)]
            Host::Unix(p) => out.push_str(&p.display().to_string()),
        }
        let port = config
            .get_ports()
            .get(i)
            .or(config.get_ports().first())
            .copied()
            .unwrap_or(5432);
        let _ = write!(out, ":{port}");
    }
    let _ = write!(
        out,
        "/{} as {}",
        config.get_dbname().unwrap_or("<default>"),
        config.get_user().unwrap_or("<default>")
    );
    out
}

/// An error with its causes, `a: b: c` (tokio-postgres puts the useful part in the causes).
pub(crate) fn error_chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // Many errors already print their cause; don't repeat it.
        let text = cause.to_string();
        if !out.ends_with(&text) {
            let _ = write!(out, ": {text}");
        }
        source = cause.source();
    }
    out
}

/// Connects, retrying while Postgres is not up yet, for at most `within`.
///
/// Errors the server reports (bad password, missing database) fail at once, except
/// "the database system is starting up".
pub(crate) async fn connect_with_retry(
    config: &Config,
    within: Duration,
) -> anyhow::Result<Client> {
    let target = describe(config);
    let started = Instant::now();
    let mut attempts = 0_u32;
    loop {
        attempts += 1;
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %error_chain(&e), "setup connection failed");
                    }
                });
                tracing::info!(%target, attempts, "connected to Postgres");
                return Ok(client);
            }
            Err(err) => {
                let starting_up = err.as_db_error().is_some_and(|db| {
                    db.code() == &tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW
                });
                if err.as_db_error().is_some() && !starting_up {
                    bail!(
                        "Postgres at {target} refused the connection: {}",
                        error_chain(&err)
                    );
                }
                let elapsed = started.elapsed();
                if elapsed >= within {
                    bail!(
                        "cannot connect to Postgres at {target} (gave up after {:.1}s, {attempts} attempts): {}",
                        elapsed.as_secs_f64(),
                        error_chain(&err)
                    );
                }
                if attempts == 1 {
                    tracing::info!(%target, error = %error_chain(&err), "Postgres not reachable yet, retrying");
                }
                tokio::time::sleep(RETRY_DELAY.min(within.saturating_sub(elapsed))).await;
            }
        }
    }
}

/// The pool the request handlers draw from.
pub(crate) fn build_pool(config: Config, size: usize) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(CONNECT_ATTEMPT_TIMEOUT * 2))
        .build()
        .context("building the connection pool")
}

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS users (
    id           BIGSERIAL PRIMARY KEY,
    platform     TEXT NOT NULL,
    email        TEXT NOT NULL,
    password_md5 TEXT NOT NULL,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL DEFAULT 'member',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (platform, email)
);
CREATE TABLE IF NOT EXISTS auth_tokens (
    token      TEXT PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    platform   TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS campaigns (
    id           BIGSERIAL PRIMARY KEY,
    platform     TEXT NOT NULL,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL,
    channel      TEXT NOT NULL,
    budget_cents BIGINT NOT NULL DEFAULT 0,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS campaigns_platform_idx ON campaigns (platform, id);
CREATE TABLE IF NOT EXISTS leads (
    id          BIGSERIAL PRIMARY KEY,
    platform    TEXT NOT NULL,
    campaign_id BIGINT REFERENCES campaigns (id),
    email       TEXT NOT NULL,
    name        TEXT NOT NULL,
    company     TEXT,
    status      TEXT NOT NULL DEFAULT 'new',
    score       INTEGER NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS leads_platform_idx ON leads (platform, id);
CREATE INDEX IF NOT EXISTS leads_campaign_idx ON leads (campaign_id);
CREATE TABLE IF NOT EXISTS websites (
    id             BIGSERIAL PRIMARY KEY,
    platform       TEXT NOT NULL,
    domain         TEXT NOT NULL,
    title          TEXT NOT NULL,
    published      BOOLEAN NOT NULL DEFAULT false,
    monthly_visits BIGINT NOT NULL DEFAULT 0,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS websites_platform_idx ON websites (platform, id);
CREATE TABLE IF NOT EXISTS videos (
    id            BIGSERIAL PRIMARY KEY,
    platform      TEXT NOT NULL,
    title         TEXT NOT NULL,
    url           TEXT NOT NULL,
    duration_secs INTEGER NOT NULL,
    views         BIGINT NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS videos_platform_idx ON videos (platform, id);
CREATE TABLE IF NOT EXISTS conversations (
    id              BIGSERIAL PRIMARY KEY,
    platform        TEXT NOT NULL,
    contact_email   TEXT NOT NULL,
    subject         TEXT NOT NULL,
    channel         TEXT NOT NULL,
    status          TEXT NOT NULL,
    message_count   INTEGER NOT NULL DEFAULT 0,
    last_message_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS conversations_platform_idx ON conversations (platform, id);
CREATE TABLE IF NOT EXISTS tackle_deals (
    id             BIGSERIAL PRIMARY KEY,
    platform       TEXT NOT NULL,
    name           TEXT NOT NULL,
    stage          TEXT NOT NULL,
    amount_cents   BIGINT NOT NULL,
    owner_email    TEXT NOT NULL,
    expected_close DATE,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tackle_deals_platform_idx ON tackle_deals (platform, id);
CREATE TABLE IF NOT EXISTS demo_seed (
    version   INTEGER PRIMARY KEY,
    seeded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
";

/// Creates the schema if missing and seeds it once (safe with several instances starting
/// at once: the work runs in one transaction under an advisory lock).
pub(crate) async fn setup(client: &mut Client) -> anyhow::Result<()> {
    let tx = client
        .transaction()
        .await
        .context("starting schema transaction")?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SETUP_LOCK_KEY])
        .await
        .context("taking the setup advisory lock")?;
    // Quiet the "relation … already exists, skipping" notices of a second start.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .context("setting client_min_messages")?;
    tx.batch_execute(SCHEMA)
        .await
        .context("creating the schema")?;
    let seeded = tx
        .query_opt(
            "SELECT 1 FROM demo_seed WHERE version = $1",
            &[&SEED_VERSION],
        )
        .await
        .context("reading seed state")?
        .is_some();
    if seeded {
        tracing::info!("schema present, already seeded");
    } else {
        for platform in Platform::ALL {
            seed_platform(&tx, platform)
                .await
                .with_context(|| format!("seeding {}", platform.domain()))?;
        }
        tx.execute(
            "INSERT INTO demo_seed (version) VALUES ($1)",
            &[&SEED_VERSION],
        )
        .await
        .context("recording the seed")?;
        tracing::info!(platforms = Platform::ALL.len(), "schema created and seeded");
    }
    tx.commit().await.context("committing schema and seed")?;
    Ok(())
}

const COMPANIES: [&str; 8] = [
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark Industries",
    "Wayne Enterprises",
    "Soylent",
];
const FIRST_NAMES: [&str; 10] = [
    "Ada", "Brian", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
];

type Tx<'a> = tokio_postgres::Transaction<'a>;

async fn seed_platform(tx: &Tx<'_>, platform: Platform) -> anyhow::Result<()> {
    seed_users(tx, platform).await?;
    seed_campaigns_and_leads(tx, platform).await?;
    seed_websites(tx, platform).await?;
    seed_videos(tx, platform).await?;
    seed_conversations(tx, platform).await?;
    seed_deals(tx, platform).await?;
    Ok(())
}

fn slug(company: &str) -> String {
    company.to_lowercase().replace(' ', "-")
}

async fn seed_users(tx: &Tx<'_>, platform: Platform) -> anyhow::Result<()> {
    let p = platform.domain();
    for (local, name, role) in [
        ("alice", "Alice Admin", "admin"),
        ("bob", "Bob Builder", "member"),
        ("carol", "Carol Viewer", "viewer"),
    ] {
        tx.execute(
            "INSERT INTO users (platform, email, password_md5, name, role) \
             VALUES ($1, $2, md5($3), $4, $5)",
            &[&p, &format!("{local}@{p}"), &SEED_PASSWORD, &name, &role],
        )
        .await?;
    }
    Ok(())
}

/// Four campaigns with five leads each.
async fn seed_campaigns_and_leads(tx: &Tx<'_>, platform: Platform) -> anyhow::Result<()> {
    let p = platform.domain();
    let campaigns = [
        ("Spring Outreach", "active", "email", 250_000_i64),
        ("Webinar Follow-up", "active", "webinar", 120_000),
        ("LinkedIn Warm Intro", "paused", "linkedin", 80_000),
        ("Retargeting Q4", "draft", "ads", 400_000),
    ];
    let mut lead_no = 0_i32;
    for (ci, (name, status, channel, budget)) in (0_i32..).zip(campaigns) {
        let campaign_id: i64 = tx
            .query_one(
                "INSERT INTO campaigns (platform, name, status, channel, budget_cents, created_at) \
                 VALUES ($1, $2, $3, $4, $5, now() - make_interval(days => $6)) RETURNING id",
                &[
                    &p,
                    &format!("{} {name}", platform.display_name()),
                    &status,
                    &channel,
                    &budget,
                    &(40 - 7 * ci),
                ],
            )
            .await?
            .get(0);
        for _ in 0..5 {
            let n = lead_no.unsigned_abs() as usize;
            let first = FIRST_NAMES[n % FIRST_NAMES.len()];
            let company = COMPANIES[(n * 3 + ci.unsigned_abs() as usize) % COMPANIES.len()];
            let status = ["new", "contacted", "qualified", "won", "lost"][n % 5];
            tx.execute(
                "INSERT INTO leads (platform, campaign_id, email, name, company, status, score, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, now() - make_interval(hours => $8))",
                &[
                    &p,
                    &campaign_id,
                    &format!("{}.{lead_no}@{}.example", first.to_lowercase(), slug(company)),
                    &format!("{first} Lead{lead_no}"),
                    &company,
                    &status,
                    &((lead_no * 37 + ci * 11) % 100),
                    &(lead_no * 5),
                ],
            )
            .await?;
            lead_no += 1;
        }
    }
    Ok(())
}

async fn seed_websites(tx: &Tx<'_>, platform: Platform) -> anyhow::Result<()> {
    let p = platform.domain();
    for (sub, title, published, visits) in [
        ("www", "Home", true, 48_000_i64),
        ("blog", "Blog", true, 12_500),
        ("try", "Landing page (draft)", false, 0),
    ] {
        tx.execute(
            "INSERT INTO websites (platform, domain, title, published, monthly_visits) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &p,
                &format!("{sub}.{p}"),
                &format!("{} {title}", platform.display_name()),
                &published,
                &visits,
            ],
        )
        .await?;
    }
    Ok(())
}

async fn seed_videos(tx: &Tx<'_>, platform: Platform) -> anyhow::Result<()> {
    let p = platform.domain();
    for (i, (title, secs, views)) in (1..).zip([
        ("Product tour", 185_i32, 9_100_i64),
        ("Getting started in 5 minutes", 300, 4_300),
        ("Customer story: Globex", 142, 1_250),
        ("Webinar recording", 2_710, 610),
    ]) {
        tx.execute(
            "INSERT INTO videos (platform, title, url, duration_secs, views) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &p,
                &format!("{}: {title}", platform.display_name()),
                &format!("https://media.{p}/v/{i}"),
                &secs,
                &views,
            ],
        )
        .await?;
    }
    Ok(())
}

async fn seed_conversations(tx: &Tx<'_>, platform: Platform) -> anyhow::Result<()> {
    let p = platform.domain();
    for (i, (subject, channel, status, messages)) in (0_i32..).zip([
        ("Pricing question", "email", "open", 3_i32),
        ("Demo request", "chat", "open", 5),
        ("Invoice copy", "email", "closed", 2),
        ("Integration help", "chat", "pending", 8),
    ]) {
        let company = COMPANIES[i.unsigned_abs() as usize % COMPANIES.len()];
        tx.execute(
            "INSERT INTO conversations \
             (platform, contact_email, subject, channel, status, message_count, last_message_at) \
             VALUES ($1, $2, $3, $4, $5, $6, now() - make_interval(mins => $7))",
            &[
                &p,
                &format!("contact{}@{}.example", i + 1, slug(company)),
                &subject,
                &channel,
                &status,
                &messages,
                &(i * 90),
            ],
        )
        .await?;
    }
    Ok(())
}

async fn seed_deals(tx: &Tx<'_>, platform: Platform) -> anyhow::Result<()> {
    let p = platform.domain();
    for (i, (name, stage, amount)) in (0_i32..).zip([
        ("Acme renewal", "negotiation", 1_200_000_i64),
        ("Globex expansion", "proposal", 3_400_000),
        ("Initech pilot", "qualification", 450_000),
        ("Hooli enterprise", "closed_won", 9_900_000),
    ]) {
        tx.execute(
            "INSERT INTO tackle_deals (platform, name, stage, amount_cents, owner_email, expected_close) \
             VALUES ($1, $2, $3, $4, $5, current_date + $6::int)",
            &[&p, &name, &stage, &amount, &format!("bob@{p}"), &(i * 21 + 7)],
        )
        .await?;
    }
    Ok(())
}
