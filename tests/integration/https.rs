//! HTTPS as deployed: a real nginx from deploy/nginx-silverguard.conf (ports, upstream and
//! certificate paths substituted) in front of the service, with the TLS certificates made by
//! deploy/make-certs.sh. Proves the documented setup: HTTP redirects to HTTPS, HSTS, the
//! session cookie is `Secure`, the live board's event stream passes through, `/metrics` is
//! not published, and the login limit keys on the client address nginx saw — which a client
//! cannot forge with its own `X-Forwarded-For`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use silverguard::api::auth::{self, NewUser, UserRole};

use crate::helpers::*;

const PASSWORD: &str = "correct horse battery";

/// nginx from the deployment file, run as a foreground child with its own prefix.
struct Nginx {
    http_port: u16,
    https_port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(upstream: std::net::SocketAddr) -> Nginx {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let made = Command::new("bash")
            .arg(root.join("deploy/make-certs.sh"))
            .arg(&certs)
            .args(["localhost", "127.0.0.1"])
            .output()
            .expect("run deploy/make-certs.sh");
        assert!(made.status.success(), "{made:?}");
        let (http_port, https_port) = (free_port(), free_port());
        let site = std::fs::read_to_string(root.join("deploy/nginx-silverguard.conf"))
            .expect("deploy/nginx-silverguard.conf");
        let mut substituted = 0;
        let site: String = site
            .lines()
            .filter(|l| !l.trim_start().starts_with("listen [::]"))
            .map(|l| {
                let t = l.trim_start();
                let out = if t == "server 127.0.0.1:8080;" {
                    format!("server {upstream};")
                } else if t == "listen 80;" {
                    format!("listen 127.0.0.1:{http_port};")
                } else if t.starts_with("listen 443 ") {
                    format!("listen 127.0.0.1:{https_port} ssl http2;")
                } else if t.starts_with("ssl_certificate ") {
                    format!("ssl_certificate {};", certs.join("server.crt").display())
                } else if t.starts_with("ssl_certificate_key ") {
                    format!(
                        "ssl_certificate_key {};",
                        certs.join("server.key").display()
                    )
                } else {
                    return l.to_string();
                };
                substituted += 1;
                out
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            substituted, 5,
            "the deployment file's shape changed:\n{site}"
        );
        let d = dir.path().display();
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n access_log {d}/access.log;\n client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n{site}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nginx (installed by scripts/test.sh)");
        let n = Nginx {
            http_port,
            https_port,
            child,
            dir,
        };
        wait_until("nginx listens", Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", https_port))
                .await
                .is_ok()
        })
        .await;
        n
    }

    fn ca(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(
            &std::fs::read(self.dir.path().join("certs/ca.crt")).expect("ca.crt"),
        )
        .expect("CA certificate")
    }

    /// An HTTPS client trusting only the deployment's CA, connecting from `from` (any
    /// 127.0.0.0/8 address is this host, so tests can be "different clients").
    fn client(&self, from: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_certs_only([self.ca()])
            .local_address(from.parse::<IpAddr>().ok())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client")
    }

    fn https(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https_port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_bin() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

async fn login(c: &reqwest::Client, url: &str, user: &str, password: &str) -> reqwest::Response {
    c.post(url)
        .form(&[("username", user), ("password", password), ("next", "/")])
        .send()
        .await
        .expect("POST /login")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_behind_nginx_over_https_as_deployed() {
    let db = TestDb::new().await;
    let broker = TestBroker::start().await;
    let mut s = settings(&db, &broker);
    s.http.cookie_secure = true;
    s.http.trusted_proxies = vec!["127.0.0.1".parse().expect("ip")];
    let app = RunningApp::start(s).await;
    let pool = {
        let mut s = silverguard::config::Settings::default();
        s.database.url = silverguard::config::Secret::new(db.url.clone());
        silverguard::store::build_pool(&s.database).expect("pool")
    };
    for name in ["ops", "victim"] {
        auth::upsert_user(
            &pool,
            &NewUser {
                username: name.into(),
                display_name: None,
                role: UserRole::Admin,
                password: PASSWORD.into(),
                regions: Vec::new(),
                contact: None,
                language: Some("en".into()),
            },
        )
        .await
        .expect("user");
    }
    let nginx = Nginx::start(app.http).await;

    // Plain HTTP only redirects to HTTPS.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(format!("http://127.0.0.1:{}/login", nginx.http_port))
        .send()
        .await
        .expect("GET over HTTP");
    assert_eq!(plain.status(), 301);
    let to = plain.headers()["location"].to_str().expect("location");
    assert!(to.starts_with("https://"), "{to}");

    // Over HTTPS: the login page with HSTS; logging in sets a Secure session cookie.
    let c = nginx.client("127.0.0.1");
    let page = c
        .get(nginx.https("/login"))
        .send()
        .await
        .expect("GET /login");
    assert_eq!(page.status(), 200);
    assert!(page.headers().contains_key("strict-transport-security"));
    let res = login(&c, &nginx.https("/login"), "ops", PASSWORD).await;
    assert_eq!(res.status(), 303, "{:?}", res.text().await);
    let set_cookie = res.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_string();
    assert!(set_cookie.contains("Secure"), "{set_cookie}");
    let session = set_cookie
        .split(';')
        .next()
        .expect("cookie pair")
        .to_string();

    // The live board's event stream comes through with its headers, at once.
    let stream = c
        .get(nginx.https("/console/events"))
        .header("cookie", &session)
        .send()
        .await
        .expect("GET /console/events");
    assert_eq!(stream.status(), 200);
    let ct = stream.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    drop(stream);

    // Metrics are not published through the proxy (only to the host itself, which here is
    // also 127.0.0.1, so ask from another loopback address).
    let outside = nginx.client("127.0.0.2");
    let m = outside
        .get(nginx.https("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(m.status(), 403);

    // The login limit sees the client nginx saw. A client at 127.0.0.2 that guesses
    // passwords is locked out even though it claims to be someone new each time ...
    let mut last = 0;
    for i in 0..7 {
        let r = outside
            .post(nginx.https("/login"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .form(&[("username", "victim"), ("password", "guess"), ("next", "/")])
            .send()
            .await
            .expect("POST /login");
        last = r.status().as_u16();
    }
    assert_eq!(last, 429, "the guesser is limited by its real address");
    // ... while the real user, from another address, still logs in.
    let other = nginx.client("127.0.0.3");
    let ok = login(&other, &nginx.https("/login"), "victim", PASSWORD).await;
    assert_eq!(ok.status(), 303, "another client is not locked out");

    let log = std::fs::read_to_string(nginx.dir.path().join("access.log")).unwrap_or_default();
    assert!(log.contains("127.0.0.2"), "nginx saw the guesser:\n{log}");
    pool.close();
    app.stop().await;
}
