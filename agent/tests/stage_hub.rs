//! A staged `model:` is found by the hub libraries themselves, offline: the
//! REAL ms-swift (`safe_snapshot_download`, what `--model` goes through) and
//! modelscope of the venvs of tools/swift-flags/venvs.sh resolve the model id
//! against the staged cache inside a network namespace with no network (or,
//! where one cannot be made, with every proxy pointed at a closed loopback
//! port). ms-swift's ModelScope route lists the repo online even so; the
//! path Cohort passes as `--model` instead (the node's copy in the ModelScope
//! layout) is used offline and taken for the same model. Without the venvs,
//! those checks are skipped with a message; the layout itself is checked either way.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cohort_agent::stage::hub::{HubModel, hub_root};
use cohort_agent::stage::{StageItem, StagedItem, Stager};
use cohort_shared::spec::{HubLayout, modelscope_model_dir};
use serde_json::Value;
use tokio::sync::mpsc;

/// A registered id with a dot in its name (ModelScope writes it `___`).
const MODEL: &str = "Qwen/Qwen2.5-7B-Instruct";

/// What one venv's libraries make of the staged caches (one Python process:
/// importing ms-swift takes many seconds).
const RESOLVE: &str = r#"
import json, os, sys
try:
    from swift.utils import safe_snapshot_download
except ImportError:  # ms-swift 3.x
    from swift.llm import safe_snapshot_download
try:
    from swift.model import get_matched_model_meta
except ImportError:  # ms-swift 3.x
    from swift.llm import get_matched_model_meta
from modelscope import snapshot_download
model, ms_cache, passed = sys.argv[1:4]
out = {}
def attempt(key, f):
    try:
        out[key] = {"ok": f()}
    except Exception as e:
        out[key] = {"error": f"{type(e).__name__}: {e}"}
attempt("swift_hf", lambda: safe_snapshot_download(model, use_hf=True))
attempt("modelscope_local", lambda: snapshot_download(model, cache_dir=ms_cache, local_files_only=True))
attempt("swift_modelscope", lambda: safe_snapshot_download(model, use_hf=False))
# What Cohort passes as --model for a model staged in the ModelScope layout.
attempt("swift_passed", lambda: safe_snapshot_download(passed, use_hf=False))
model_type = lambda m: getattr(get_matched_model_meta(m), "model_type", None)
out["model_type"] = {"id": model_type(model), "passed": model_type(passed)}
print("RESULT " + json.dumps(out))
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn write_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}"#)
        .unwrap();
    std::fs::write(dir.join("model.safetensors"), vec![1u8; 4096]).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
}

async fn stage(stager: &Stager, source: &Path) -> Vec<StagedItem> {
    let (tx, mut rx) = mpsc::channel(1024);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let items: Vec<StageItem> = [("ms", HubLayout::Modelscope), ("hf", HubLayout::Huggingface)]
        .into_iter()
        .map(|(name, layout)| StageItem {
            name: name.into(),
            source: source.display().to_string(),
            sha256: None,
            model: Some(HubModel { id: MODEL.into(), layout }),
        })
        .collect();
    let staged = stager.stage(&items, tx).await.unwrap();
    drain.await.unwrap();
    staged
}

/// Where each library must find the model.
fn expected(cache: &Path, digest: &str) -> (PathBuf, PathBuf) {
    let ms = hub_root(cache, HubLayout::Modelscope).join("models/Qwen/Qwen2___5-7B-Instruct");
    let hf =
        hub_root(cache, HubLayout::Huggingface).join("models--Qwen--Qwen2.5-7B-Instruct/snapshots").join(&digest[..40]);
    (ms, hf)
}

#[tokio::test]
async fn a_staged_model_is_placed_in_both_layouts_and_replaced_in_place() {
    let (src, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_model(src.path());
    let stager = Stager::new(cache.path().to_owned(), 2);
    let staged = stage(&stager, src.path()).await;
    let digest = staged[0].sha256.clone();
    let (ms, hf) = expected(cache.path(), &digest);
    assert_eq!(staged[0].hub_cache.as_deref(), Some(hub_root(cache.path(), HubLayout::Modelscope).as_path()));
    assert_eq!(staged[1].hub_cache.as_deref(), Some(hub_root(cache.path(), HubLayout::Huggingface).as_path()));
    for place in [&ms, &hf] {
        assert_eq!(place.canonicalize().unwrap(), staged[0].path.canonicalize().unwrap(), "{}", place.display());
        assert_eq!(std::fs::read(place.join("model.safetensors")).unwrap().len(), 4096);
    }
    let refs = hub_root(cache.path(), HubLayout::Huggingface).join("models--Qwen--Qwen2.5-7B-Instruct/refs/main");
    assert_eq!(std::fs::read_to_string(&refs).unwrap(), &digest[..40], "the commit, without a newline");

    // A changed model replaces the link; the old content stays in the cache.
    std::fs::write(src.path().join("tokenizer.json"), b"{\"v\": 2}").unwrap();
    let again =
        stage(&Stager::new(cache.path().to_owned(), 2).with_record_settle(Default::default()), src.path()).await;
    assert_ne!(again[0].sha256, digest);
    let (ms2, hf2) = expected(cache.path(), &again[0].sha256);
    assert_eq!(std::fs::read(ms2.join("tokenizer.json")).unwrap(), b"{\"v\": 2}");
    assert_eq!(std::fs::read(hf2.join("tokenizer.json")).unwrap(), b"{\"v\": 2}");
    assert_eq!(std::fs::read_to_string(&refs).unwrap(), &again[0].sha256[..40]);
    assert!(staged[0].path.join("tokenizer.json").exists());
}

#[tokio::test]
async fn a_model_is_a_directory_and_a_directory_is_not_replaced_by_a_link() {
    let (src, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(src.path().join("w.bin"), b"w").unwrap();
    let item = |source: &Path| StageItem {
        name: "m".into(),
        source: source.display().to_string(),
        sha256: None,
        model: Some(HubModel { id: MODEL.into(), layout: HubLayout::Modelscope }),
    };
    let (tx, _rx) = mpsc::channel(1024);
    let error =
        Stager::new(cache.path().to_owned(), 1).stage(&[item(&src.path().join("w.bin"))], tx).await.unwrap_err();
    assert!(error.to_string().contains("must be staged from a directory"), "{error}");

    // Someone's own download at the place: left alone, and the staging says so.
    let own = hub_root(cache.path(), HubLayout::Modelscope).join("models/Qwen/Qwen2___5-7B-Instruct");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(own.join("config.json"), b"mine").unwrap();
    let (tx, _rx) = mpsc::channel(1024);
    let error = Stager::new(cache.path().to_owned(), 1).stage(&[item(src.path())], tx).await.unwrap_err();
    assert!(error.to_string().contains("something other than a link Cohort made is there"), "{error}");
    assert_eq!(std::fs::read(own.join("config.json")).unwrap(), b"mine");
}

/// No network: a new network namespace when this user may make one (then
/// not even HF_HUB_OFFLINE is set: the library finds out by itself), else
/// every proxy at a closed loopback port, so nothing leaves the machine, and
/// HF_HUB_OFFLINE=1 (huggingface_hub raises a proxy error instead of falling
/// back to its cache).
fn offline(python: &Path) -> Command {
    let own_netns = Command::new("unshare").args(["-n", "true"]).status().is_ok_and(|s| s.success());
    let mut command = if own_netns {
        let mut c = Command::new("unshare");
        c.arg("-n").arg(python);
        c
    } else {
        let mut c = Command::new(python);
        for proxy in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"] {
            c.env(proxy, "http://127.0.0.1:9");
        }
        c.env("HF_HUB_OFFLINE", "1").env_remove("NO_PROXY").env_remove("no_proxy");
        c
    };
    for inherited in ["USE_HF", "HF_HOME", "MODELSCOPE_CACHE", "HF_HUB_CACHE", "HF_ENDPOINT", "MODELSCOPE_DOMAIN"] {
        command.env_remove(inherited);
    }
    if own_netns {
        command.env_remove("HF_HUB_OFFLINE");
    }
    command
}

#[tokio::test]
async fn the_real_ms_swift_resolves_the_staged_model_offline() {
    let (src, cache, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_model(src.path());
    let staged = stage(&Stager::new(cache.path().to_owned(), 2), src.path()).await;
    let (ms, hf) = expected(cache.path(), &staged[0].sha256);
    let script = cache.path().join("resolve.py");
    std::fs::write(&script, RESOLVE).unwrap();
    let mut checked = 0;
    for version in ["3.12.6", "4.6.0"] {
        let python = repo_root().join(".venv-swift").join(version).join("bin/python");
        if !python.exists() {
            eprintln!(
                "SKIPPED for ms-swift {version}: {} not found; run `tools/swift-flags/venvs.sh {version}`",
                python.display()
            );
            continue;
        }
        let out = offline(&python)
            .arg(&script)
            .arg(MODEL)
            .arg(hub_root(cache.path(), HubLayout::Modelscope))
            // What the controller passes as --model (planner::launch_plan::use_staged_model).
            .arg(modelscope_model_dir(&hub_root(cache.path(), HubLayout::Modelscope), MODEL).unwrap())
            // What the agent gives the job's processes (planner::launch_plan::add_staged).
            .env(HubLayout::Huggingface.cache_var(), hub_root(cache.path(), HubLayout::Huggingface))
            .env(HubLayout::Modelscope.cache_var(), hub_root(cache.path(), HubLayout::Modelscope))
            .env("HOME", home.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
            panic!("ms-swift {version}: no result\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr))
        };
        let result: Value = serde_json::from_str(line).unwrap();
        assert_eq!(result["swift_hf"]["ok"], hf.display().to_string(), "ms-swift {version} (USE_HF): {result}");
        assert_eq!(result["modelscope_local"]["ok"], ms.display().to_string(), "modelscope: {result}");
        // ms-swift's ModelScope route always lists the repo online (modelscope's
        // snapshot_download without local_files_only): offline it fails, as the
        // book says. If this starts to pass, the book's advice is out of date.
        let error = result["swift_modelscope"]["error"].as_str().unwrap_or_default();
        assert!(error.contains("onnect") || error.contains("resolve"), "ms-swift {version} (ModelScope): {result}");
        // The node's copy, as Cohort passes it, is used where it lies, offline,
        // and taken for the model the id names.
        assert_eq!(result["swift_passed"]["ok"], ms.display().to_string(), "ms-swift {version} (path): {result}");
        let types = &result["model_type"];
        assert!(types["id"].is_string() && types["id"] == types["passed"], "ms-swift {version}: {result}");
        checked += 1;
    }
    if checked == 0 {
        eprintln!("SKIPPED: no ms-swift venv; only the layout was checked");
    }
}
