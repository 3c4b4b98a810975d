//! Cutting one TCP segment (IPv4 or IPv6, as NFQUEUE hands it over) into segments of at most
//! `max` bytes of data: the same headers with their own sequence number, lengths and
//! checksums; FIN and PSH only on the last piece.

const TCP: u8 = 6;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const PSH: u8 = 0x08;

/// The pieces of `packet`, or None when there is nothing to cut: not TCP, a SYN, an IPv6
/// packet with extension headers, or data of at most `max` bytes.
pub(super) fn pieces(packet: &[u8], max: usize) -> Option<Vec<Vec<u8>>> {
    let (ip_len, v6) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            (packet.get(9) == Some(&TCP)).then_some((ihl, false))?
        }
        6 => (packet.get(6) == Some(&TCP)).then_some((40, true))?,
        _ => return None,
    };
    let tcp = packet.get(ip_len..)?;
    let doff = usize::from(*tcp.get(12)? >> 4) * 4;
    let data = tcp.get(doff..)?;
    if doff < 20 || data.len() <= max || max == 0 || tcp[13] & SYN != 0 {
        return None;
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let chunks = data.len().div_ceil(max);
    let mut out = Vec::with_capacity(chunks);
    for (i, chunk) in data.chunks(max).enumerate() {
        let mut piece = Vec::with_capacity(ip_len + doff + chunk.len());
        piece.extend_from_slice(&packet[..ip_len + doff]);
        piece.extend_from_slice(chunk);
        let tcp_len = doff + chunk.len();
        if v6 {
            piece[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        } else {
            piece[2..4].copy_from_slice(&((ip_len + tcp_len) as u16).to_be_bytes());
            // The kernel fills in the ID (when zero) and the header checksum of a raw send.
            piece[4..6].copy_from_slice(&[0, 0]);
            piece[10..12].copy_from_slice(&[0, 0]);
        }
        let header = &mut piece[ip_len..];
        let offset = (i * max) as u32;
        header[4..8].copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
        if i + 1 < chunks {
            header[13] &= !(FIN | PSH);
        }
        header[16..18].copy_from_slice(&[0, 0]);
        let sum = checksum(&piece, ip_len, v6);
        piece[ip_len + 16..ip_len + 18].copy_from_slice(&sum.to_be_bytes());
        out.push(piece);
    }
    Some(out)
}

/// The TCP checksum of `packet` (its checksum field zero), with the pseudo-header.
fn checksum(packet: &[u8], ip_len: usize, v6: bool) -> u16 {
    let segment = &packet[ip_len..];
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = match pair {
                [hi, lo] => u16::from_be_bytes([*hi, *lo]),
                [hi] => u16::from_be_bytes([*hi, 0]),
                _ => 0,
            };
            sum += u64::from(word);
        }
    };
    if v6 {
        add(&packet[8..40]);
        add(&(segment.len() as u32).to_be_bytes());
        add(&[0, 0, 0, TCP]);
    } else {
        add(&packet[12..20]);
        add(&[0, TCP]);
        add(&(segment.len() as u16).to_be_bytes());
    }
    add(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP segment from 10.0.0.1:40000 to 10.0.0.2:6379 carrying `data`.
    fn segment(data: &[u8], flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((40 + data.len()) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&6379u16.to_be_bytes());
        p[24..28].copy_from_slice(&u32::MAX.to_be_bytes()); // wraps on the second piece
        p[32] = 5 << 4;
        p[33] = flags;
        p.extend_from_slice(data);
        p
    }

    #[test]
    fn pieces_carry_the_data_in_order_with_valid_checksums() {
        let data: Vec<u8> = (0..40).collect();
        let pieces = pieces(&segment(&data, 0x10 | PSH | FIN), 16).expect("cut");
        assert_eq!(pieces.len(), 3);
        let mut joined = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let len = u16::from_be_bytes([piece[2], piece[3]]) as usize;
            assert_eq!(len, piece.len());
            let seq = u32::from_be_bytes([piece[24], piece[25], piece[26], piece[27]]);
            assert_eq!(seq, u32::MAX.wrapping_add(16 * i as u32));
            let last = i == 2;
            assert_eq!(piece[33] & (PSH | FIN) != 0, last, "piece {i}");
            assert_eq!(piece[33] & 0x10, 0x10, "ACK kept");
            // A valid checksum sums (with itself) to zero.
            assert_eq!(checksum(piece, 20, false), 0, "piece {i}");
            joined.extend_from_slice(&piece[40..]);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn small_segments_syns_and_other_protocols_are_left_alone() {
        assert!(pieces(&segment(&[1; 16], 0x10), 16).is_none());
        assert!(pieces(&segment(&[1; 40], SYN), 16).is_none());
        let mut udp = segment(&[1; 40], 0);
        udp[9] = 17;
        assert!(pieces(&udp, 16).is_none());
    }
}
