//! A deterministic stand-in for the API fuzz targets (now `fuzz/src/api.rs`): a few
//! thousand mutated requests and config files from a fixed seed. Passing
//! means nothing panicked.

use api::http::{parse_request, Parsed, DEFAULT_MAX_BODY_BYTES};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap()
    }
}

const SEEDS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /vm/config HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\n\r\n",
    b"PUT /machine-config HTTP/1.1\r\nContent-Length: 38\r\n\r\n{\"vcpu_count\":2,\"mem_size_mib\":128}   ",
    b"PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 73\r\n\r\n{\"drive_id\":\"rootfs\",\"path_on_host\":\"/r\",\"is_root_device\":true}         ",
    b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\nConnection: close\r\n\r\n{\"state\":\"Paused\"}",
    b"PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 33\r\n\r\n{\"action_type\":\"InstanceStart\"}  ",
    b"PUT /network-interfaces/eth0 HTTP/1.1\r\nContent-Length: 45\r\n\r\n{\"iface_id\":\"eth0\",\"host_dev_name\":\"tap0\"}   ",
];

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"Content-Length: ",
    b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked\r\n",
    b"{",
    b"}",
    b"\"",
    b"\xff\xfe",
    b"\0",
    b" HTTP/1.1",
    b"/drives/",
    b"-1",
    b":",
];

fn mutate(rng: &mut XorShift, input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = (rng.next() & 0xff) as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let tok = TOKENS[rng.below(TOKENS.len())];
                input.splice(i..i, tok.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.below(len);
                let b = (a + rng.below(16)).min(len);
                input.drain(a..b);
            }
            4 => input.truncate(rng.below(len + 1)),
            _ => {
                let other = SEEDS[rng.below(SEEDS.len())];
                input.extend_from_slice(other);
            }
        }
    }
}

fn drive(buf: &[u8]) {
    let mut rest = buf;
    for _ in 0..16 {
        match parse_request(rest, DEFAULT_MAX_BODY_BYTES) {
            Ok(Parsed::Complete(req, used)) => {
                assert!(used > 0 && used <= rest.len());
                let _ = api::parse_api_request(&req.method, &req.path, &req.body);
                rest = &rest[used..];
            }
            Ok(Parsed::Incomplete { .. }) | Err(_) => break,
        }
    }
}

#[test]
fn mutated_requests_never_panic() {
    let mut rng = XorShift(0x5eed_c1de_0000_0001);
    let mut complete = 0;
    for i in 0..5000 {
        let mut input = SEEDS[i % SEEDS.len()].to_vec();
        mutate(&mut rng, &mut input);
        if matches!(
            parse_request(&input, DEFAULT_MAX_BODY_BYTES),
            Ok(Parsed::Complete(..))
        ) {
            complete += 1;
        }
        drive(&input);
    }
    // The mutations must still reach the router often enough to matter.
    assert!(complete > 500, "only {complete} complete requests");
    // Pure noise too.
    for _ in 0..2000 {
        let n = rng.below(300);
        let noise: Vec<u8> = (0..n).map(|_| (rng.next() & 0xff) as u8).collect();
        drive(&noise);
    }
}

#[test]
fn mutated_config_files_never_panic() {
    let base = br#"{"boot-source":{"kernel_image_path":"/k","boot_args":"a"},"machine-config":{"vcpu_count":2,"mem_size_mib":64},"drives":[{"drive_id":"r","path_on_host":"/r","is_root_device":true}],"network-interfaces":[{"iface_id":"e","host_dev_name":"t","guest_mac":"06:00:00:00:00:01"}],"vsock":{"guest_cid":3,"uds_path":"/v"}}"#;
    let mut rng = XorShift(0xc0ff_ee00_1234_5678);
    for _ in 0..3000 {
        let mut input = base.to_vec();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(input.len());
            match rng.below(3) {
                0 => input[i] = b"{}[]\":,0123456789-eE.tfn "[rng.below(25)],
                1 => {
                    input.remove(i);
                }
                _ => input.insert(i, (rng.next() & 0x7f) as u8),
            }
        }
        let text = String::from_utf8_lossy(&input);
        if let Ok(cfg) =
            api::VmConfig::from_config_file_with(&text, api::paths::PathPolicy::UNCHECKED)
        {
            cfg.validate().unwrap();
            let _ = cfg.to_full_config();
        }
    }
}
