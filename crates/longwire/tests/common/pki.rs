//! A throwaway PKI made with the `openssl` CLI: CAs, leaf certificates,
//! and client directories in the layout libnbd, qemu and longwire's own
//! client expect (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).

use super::*;
use std::path::Path;

pub fn openssl(dir: &Path, args: &[&str]) {
    require_tool("openssl");
    run_cmd(command("openssl").current_dir(dir).args(args), "openssl");
}

/// A self-signed CA `NAME-cert.pem` / `NAME-key.pem`.
pub fn make_ca(dir: &Path, name: &str) {
    let cnf = format!(
        "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3_ca\n\
         [dn]\nCN = longwire test {name}\n\
         [v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n"
    );
    std::fs::write(dir.join(format!("{name}.cnf")), cnf).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-config",
            &format!("{name}.cnf"),
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}-cert.pem"),
            "-days",
            "3650",
        ],
    );
}

/// A leaf certificate `NAME-cert.pem` / `NAME-key.pem` issued by `ca`.
pub fn make_leaf(dir: &Path, ca: &str, name: &str, subject: &str, extra: &str, serial: u32) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ],
    );
    // qemu insists on keyEncipherment when keyUsage is critical.
    let ext = format!("basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n{extra}\n");
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-set_serial",
            &serial.to_string(),
            "-days",
            "365",
            "-out",
            &format!("{name}-cert.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// Client directory `sub` for libnbd/qemu: trusts `ca`, presents `who` (if any).
pub fn client_dir(dir: &Path, sub: &str, who: Option<&str>) {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    if let Some(who) = who {
        std::fs::copy(
            dir.join(format!("{who}-cert.pem")),
            d.join("client-cert.pem"),
        )
        .unwrap();
        std::fs::copy(dir.join(format!("{who}-key.pem")), d.join("client-key.pem")).unwrap();
    }
}
