"""A small polyphonic sound-event benchmark built from real recordings that Debian packages ship.

Classes (label, display name: recordings and the package they come from):

- speech, Speech: the spoken prompts of asterisk-core-sounds-en-wav (one female voice, top-level
  files), the spoken channel names of alsa-utils (Front_Left.wav, ..., Noise.wav) and of
  sound-theme-freedesktop (audio-channel-*.oga, audio-test-signal.oga)
- keyboard, Keyboard instrument: sound-icons cembalo-*, klavichord-4, piano-3, electric-piano-3
- strings, String instrument: sound-icons guitar-12, guitar-13, violoncello-7
- trumpet, Trumpet: sound-icons trumpet-1, trumpet-12
- percussion, Percussion: sound-icons percussion-10/12/28/50, cymbaly-1, xylofon
- animal, Animal: sound-icons canary-long, cockchafer-gentleman-1, gummy-cat-2; asterisk tt-monkeys
- beep, Electronic beep: sound-icons pisk-*; asterisk beep, beeperr, ascending-2tone, descending-2tone
- chime, Notification chime: freedesktop bell, complete, dialog-information, dialog-warning,
  message, message-new-instant, device-added, device-removed, service-login, service-logout,
  suspend-error, audio-volume-change
- ring, Telephone or alarm ring: freedesktop phone-incoming-call, phone-outgoing-busy,
  phone-outgoing-calling, alarm-clock-elapsed
- household, Household object: freedesktop camera-shutter, trash-empty; sound-icons glass-water-1

Symbolic links (several theme names point at one file) are not separate recordings. A class with
fewer than two recordings on this machine is dropped (listed in benchmark.json).

Each class's recordings are split into train and test recordings (about `test_fraction` of them,
at least one each, drawn from the seed), so every test event comes from a recording no training
clip uses. Clips are 16 kHz mono, `clip_seconds` long, 16-bit wav:

- mono_train / mono_test: one event per clip (single-label);
- poly_train / poly_test: scenes of `min_events`..`max_events` events of distinct classes (multi-label),
  each event at its own random offset in the clip and its own random gain, so events overlap
  partly, wholly or not at all.

An event is a recording with its leading/trailing silence trimmed, cropped at random to the clip
length when longer, scaled to a common RMS and then by a random gain (`gain_db` range); a clip that
would clip is scaled down as a whole.

With `source="instruments"` the classes are General MIDI instrument families (`INSTRUMENT_FAMILIES`:
piano, organ, guitar, bass, strings, brass, reed, pipe, ...) rendered by fluidsynth (Debian
`fluidsynth`) from a GM soundfont (`fluid-soundfont-gm` or `timgm6mb-soundfont`): each "recording"
is a phrase of notes and chords that one program of the family plays, drawn from the seed, so a
family has programs x `phrases_per_program` recordings (default `INSTRUMENT_PHRASES`; the drum kit
8x that); one MIDI file holds every phrase and is rendered once. A scene mixes events of
distinct families, so its labels are the union of its events' families.

With `source="synthetic"` (or "auto" when the recordings are missing) the classes are synthesised
signals instead (tones, chirps, noise bursts, ...: `SYNTHETIC_CLASSES`), each "recording" one
random prototype of its class. That benchmark is labelled as synthesised everywhere: it is written
under `<out_dir>/synthesised` (a real one under `<out_dir>/recordings`), its labels start with
`synth_`, benchmark.json says `"synthesised": true`, and so does the returned `Benchmark`.

Layout under the root: `<split>.tsv` (fairseq manifest, root line = this directory),
`<split>.lbl` (`clip id<TAB>label,label`), `label_descriptors.csv` (`index,label,name`),
`<split>.events.json` (per clip: the events, their recordings, offsets and gains) and benchmark.json.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import data as _data
from ..data import audio as _audio

SAMPLE_RATE = 16000
SPLITS = ("mono_train", "mono_test", "poly_train", "poly_test")

ALSA_DIR = "/usr/share/sounds/alsa"
FREEDESKTOP_DIR = "/usr/share/sounds/freedesktop/stereo"
SOUND_ICONS_DIR = "/usr/share/sounds/sound-icons"
ASTERISK_DIRS = ("/usr/share/asterisk/sounds/en", "/usr/share/asterisk/sounds/en_US_f_Allison")

PACKAGES = {
    "alsa-utils": ALSA_DIR,
    "sound-theme-freedesktop": FREEDESKTOP_DIR,
    "sound-icons": SOUND_ICONS_DIR,
    "asterisk-core-sounds-en-wav": ASTERISK_DIRS,
}

_ASTERISK_NOT_SPEECH = {"beep.wav", "beeperr.wav", "ascending-2tone.wav", "descending-2tone.wav", "tt-monkeys.wav"}

# label -> (display name, [(package, file name or glob pattern), ...]); "asterisk-speech" is every
# top-level asterisk prompt that is not in _ASTERISK_NOT_SPEECH.
RECORDED_CLASSES: Dict[str, Tuple[str, List[Tuple[str, str]]]] = {
    "speech": ("Speech", [("asterisk-core-sounds-en-wav", "asterisk-speech"), ("alsa-utils", "*.wav"),
                          ("sound-theme-freedesktop", "audio-channel-*.oga"), ("sound-theme-freedesktop", "audio-test-signal.oga")]),
    "keyboard": ("Keyboard instrument", [("sound-icons", "cembalo-*.wav"), ("sound-icons", "klavichord-4.wav"),
                                         ("sound-icons", "piano-3.wav"), ("sound-icons", "electric-piano-3.wav")]),
    "strings": ("String instrument", [("sound-icons", "guitar-12.wav"), ("sound-icons", "guitar-13.wav"),
                                      ("sound-icons", "violoncello-7.wav")]),
    "trumpet": ("Trumpet", [("sound-icons", "trumpet-1.wav"), ("sound-icons", "trumpet-12.wav")]),
    "percussion": ("Percussion", [("sound-icons", "percussion-*.wav"), ("sound-icons", "cymbaly-1.wav"),
                                  ("sound-icons", "xylofon.wav")]),
    "animal": ("Animal", [("sound-icons", "canary-long.wav"), ("sound-icons", "cockchafer-gentleman-1.wav"),
                          ("sound-icons", "gummy-cat-2.wav"), ("asterisk-core-sounds-en-wav", "tt-monkeys.wav")]),
    "beep": ("Electronic beep", [("sound-icons", "pisk-*.wav"), ("asterisk-core-sounds-en-wav", "beep.wav"),
                                 ("asterisk-core-sounds-en-wav", "beeperr.wav"), ("asterisk-core-sounds-en-wav", "ascending-2tone.wav"),
                                 ("asterisk-core-sounds-en-wav", "descending-2tone.wav")]),
    "chime": ("Notification chime", [("sound-theme-freedesktop", name + ".oga") for name in (
        "bell", "complete", "dialog-information", "dialog-warning", "message", "message-new-instant", "device-added",
        "device-removed", "service-login", "service-logout", "suspend-error", "audio-volume-change")]),
    "ring": ("Telephone or alarm ring", [("sound-theme-freedesktop", name + ".oga") for name in (
        "phone-incoming-call", "phone-outgoing-busy", "phone-outgoing-calling", "alarm-clock-elapsed")]),
    "household": ("Household object", [("sound-theme-freedesktop", "camera-shutter.oga"), ("sound-theme-freedesktop", "trash-empty.oga"),
                                       ("sound-icons", "glass-water-1.wav")]),
}

SYNTHETIC_CLASSES: Dict[str, str] = {
    "synth_tone": "Synthetic steady tone",
    "synth_chirp_up": "Synthetic rising chirp",
    "synth_chirp_down": "Synthetic falling chirp",
    "synth_noise_burst": "Synthetic band-limited noise burst",
    "synth_harmonic": "Synthetic harmonic stack",
    "synth_click_train": "Synthetic click train",
    "synth_am_tone": "Synthetic amplitude-modulated tone",
    "synth_two_tone": "Synthetic two-tone alternation",
}
SYNTHETIC_RECORDINGS_PER_CLASS = 6

SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/TimGM6mb.sf2",
              "/usr/share/sounds/sf2/default-GM.sf2")
DRUM_CHANNEL = 9  # GM: MIDI channel 10 plays the percussion kit whatever the program
# label -> (display name, GM programs (0-based), MIDI pitch range); "drums" plays kit 0 on the drum
# channel, its "pitches" being the GM percussion keys.
INSTRUMENT_FAMILIES: Dict[str, Tuple[str, Tuple[int, ...], Tuple[int, int]]] = {
    "piano": ("Piano", tuple(range(0, 8)), (36, 84)),
    "chromatic_percussion": ("Chromatic percussion", tuple(range(8, 16)), (60, 96)),
    "organ": ("Organ", tuple(range(16, 24)), (36, 84)),
    "guitar": ("Guitar", tuple(range(24, 32)), (40, 76)),
    "bass": ("Bass", tuple(range(32, 40)), (28, 55)),
    "strings": ("Bowed or plucked strings", tuple(range(40, 47)), (40, 84)),
    "brass": ("Brass", tuple(range(56, 64)), (40, 80)),
    "reed": ("Reed", tuple(range(64, 72)), (48, 80)),
    "pipe": ("Pipe", tuple(range(72, 80)), (60, 90)),
    "synth_lead": ("Synth lead", tuple(range(80, 88)), (48, 84)),
    "drums": ("Drum kit", (0,), (35, 81)),
}
INSTRUMENT_PHRASES = 2  # phrases per program (drums: per kit, times 8)
PHRASE_SECONDS = 3.0
RELEASE_SECONDS = 1.5  # silence after each phrase in the rendering, for its release tail


@dataclass
class Benchmark:
    """What `build_benchmark` wrote. manifests/labels/events: split -> path."""

    root: str
    synthesised: bool
    classes: List[str]
    manifests: Dict[str, str]
    labels: Dict[str, str]
    events: Dict[str, str]
    descriptors: str
    info: dict = field(repr=False)


def _package_dir(package: str) -> Optional[str]:
    where = PACKAGES[package]
    for directory in (where,) if isinstance(where, str) else where:
        if os.path.isdir(directory):
            return directory
    return None


def _recording_files(package: str, pattern: str) -> List[str]:
    directory = _package_dir(package)
    if directory is None:
        return []
    if pattern == "asterisk-speech":
        found = [p for p in glob.glob(os.path.join(directory, "*.wav")) if os.path.basename(p) not in _ASTERISK_NOT_SPEECH]
    else:
        found = glob.glob(os.path.join(directory, pattern))
    return sorted(p for p in found if os.path.isfile(p) and not os.path.islink(p))


def recorded_sources() -> Dict[str, List[Tuple[str, str]]]:
    """label -> [(recording id "package:file name", path), ...] for the recordings on this machine."""
    out = {}
    for label, (_, parts) in RECORDED_CLASSES.items():
        found = {}
        for package, pattern in parts:
            for path in _recording_files(package, pattern):
                found[f"{package}:{os.path.basename(path)}"] = path
        out[label] = sorted(found.items())
    return out


def _trim_silence(wave: np.ndarray, floor_db: float = -40.0) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wave) > np.abs(wave).max() * 10 ** (floor_db / 20))
    return wave[loud[0]: loud[-1] + 1] if loud.size else wave


def _load_recording(path: str) -> np.ndarray:
    mono, rate = _audio.decode(path)
    wave = _audio.resample(torch.from_numpy(mono), rate, SAMPLE_RATE).numpy().astype(np.float64)
    return _trim_silence(wave)


def _synthetic_recording(label: str, rng: np.random.Generator) -> np.ndarray:
    duration = rng.uniform(0.5, 2.0)
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = np.minimum(1.0, np.minimum(t, duration - t) / 0.02)
    if label == "synth_tone":
        wave = np.sin(2 * np.pi * rng.uniform(300, 3000) * t)
    elif label in ("synth_chirp_up", "synth_chirp_down"):
        f0, f1 = sorted(rng.uniform(200, 6000, size=2))
        if label == "synth_chirp_down":
            f0, f1 = f1, f0
        wave = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * duration)))
    elif label == "synth_noise_burst":
        spectrum = np.fft.rfft(rng.standard_normal(len(t)))
        freqs = np.fft.rfftfreq(len(t), 1 / SAMPLE_RATE)
        low = rng.uniform(200, 3000)
        spectrum[(freqs < low) | (freqs > low * rng.uniform(1.5, 3.0))] = 0
        wave = np.fft.irfft(spectrum, len(t))
    elif label == "synth_harmonic":
        f0 = rng.uniform(80, 400)
        wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 11) if k * f0 < SAMPLE_RATE / 2)
    elif label == "synth_click_train":
        wave = np.zeros(len(t))
        wave[:: int(SAMPLE_RATE / rng.uniform(4, 30))] = 1.0
        envelope = 1.0
    elif label == "synth_am_tone":
        wave = np.sin(2 * np.pi * rng.uniform(300, 3000) * t) * (1 + np.sin(2 * np.pi * rng.uniform(3, 15) * t)) / 2
    else:
        f_a, f_b, rate = rng.uniform(400, 2500), rng.uniform(400, 2500), rng.uniform(2, 8)
        wave = np.sin(2 * np.pi * np.where(np.sin(2 * np.pi * rate * t) > 0, f_a, f_b) * t)
    return wave * envelope


def soundfont() -> Optional[str]:
    """The first GM soundfont of `SOUNDFONTS` on this machine, or None."""
    return next((path for path in SOUNDFONTS if os.path.isfile(path)), None)


def instruments_available() -> bool:
    return shutil.which("fluidsynth") is not None and soundfont() is not None


def _phrase(label: str, rng: np.random.Generator) -> List[Tuple[float, float, List[int], int]]:
    """A phrase of `label`'s family: [(start s, duration s, MIDI pitches, velocity)], notes and chords
    (a major or minor triad) at random pitches of the family's range, within PHRASE_SECONDS."""
    low, high = INSTRUMENT_FAMILIES[label][2]
    notes, t = [], 0.0
    while True:
        duration = float(rng.uniform(0.3, 1.2))
        if t + duration > PHRASE_SECONDS:
            return notes
        if label == "drums":
            pitches = sorted({int(p) for p in rng.integers(low, high + 1, size=int(rng.integers(1, 3)))})
        else:
            root = int(rng.integers(low, high - 6))
            pitches = [root] if rng.random() < 0.5 else [root, root + (3 if rng.random() < 0.5 else 4), root + 7]
        notes.append((t, duration, pitches, int(rng.integers(60, 121))))
        t += duration + float(rng.uniform(0.0, 0.3))


def _midi_file(events: List[Tuple[float, bytes]]) -> bytes:
    """A format-0 standard MIDI file of (time s, channel message) at 120 bpm, 480 ticks a quarter."""
    ticks_per_second = 960

    def vlq(n: int) -> bytes:
        out = [n & 0x7F]
        while n > 0x7F:
            n >>= 7
            out.append((n & 0x7F) | 0x80)
        return bytes(reversed(out))

    track, last = b"", 0
    for time_s, message in sorted(events, key=lambda e: e[0]):
        tick = int(round(time_s * ticks_per_second))
        track += vlq(tick - last) + message
        last = tick
    track += vlq(0) + b"\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(track)) + track


def _instrument_recordings(seed: int, phrases_per_program: int = INSTRUMENT_PHRASES
                           ) -> Tuple[Dict[str, List[str]], Dict[str, np.ndarray]]:
    """Render `phrases_per_program` phrases of every program of every family (one MIDI file, one
    fluidsynth run): (label -> recording ids, recording id -> 16 kHz samples with silence trimmed)."""
    slot = PHRASE_SECONDS + RELEASE_SECONDS
    recordings, slots, events = {}, {}, []
    melodic = [c for c in range(16) if c != DRUM_CHANNEL]
    for f, (label, (_, programs, _)) in enumerate(INSTRUMENT_FAMILIES.items()):
        phrases = phrases_per_program * (8 if label == "drums" else 1)
        recordings[label] = []
        for program in programs:
            for k in range(phrases):
                rec = f"gm:{label}/program{program:03d}/phrase{k}"
                start = len(slots) * slot
                channel = DRUM_CHANNEL if label == "drums" else melodic[len(slots) % len(melodic)]
                events.append((start, bytes([0xC0 | channel, program])))
                for t, duration, pitches, velocity in _phrase(label, np.random.default_rng([seed, 5, f, program, k])):
                    for pitch in pitches:
                        events.append((start + t, bytes([0x90 | channel, pitch, velocity])))
                        events.append((start + t + duration, bytes([0x80 | channel, pitch, 0])))
                slots[rec] = len(slots)
                recordings[label].append(rec)
    with tempfile.TemporaryDirectory() as tmp:
        midi, wav = os.path.join(tmp, "phrases.mid"), os.path.join(tmp, "phrases.wav")
        with open(midi, "wb") as f:
            f.write(_midi_file(events))
        # no reverb or chorus: each phrase ends within its slot; -q -n -i: no banner, MIDI input or shell
        subprocess.run(["fluidsynth", "-q", "-n", "-i", "-R", "0", "-C", "0", "-g", "0.5", "-r", str(SAMPLE_RATE),
                        "-F", wav, soundfont(), midi], check=True, capture_output=True, timeout=600)
        mono, rate = _audio.decode(wav)
    samples = _audio.resample(torch.from_numpy(mono), rate, SAMPLE_RATE).numpy().astype(np.float64)
    n = int(slot * SAMPLE_RATE)
    waves = {rec: _trim_silence(samples[i * n: (i + 1) * n]) for rec, i in slots.items()}
    return recordings, waves


def _split_recordings(ids: Sequence[str], rng: np.random.Generator, test_fraction: float) -> Tuple[List[str], List[str]]:
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_test = min(len(ids) - 1, max(1, int(round(test_fraction * len(ids)))))
    return sorted(order[n_test:]), sorted(order[:n_test])


def _event(wave: np.ndarray, n: int, rng: np.random.Generator, gain_db: Tuple[float, float]) -> Tuple[np.ndarray, int, float]:
    """(the event's samples, crop start in the recording, gain in dB): at most n samples, at RMS
    0.1 times the gain."""
    start = int(rng.integers(0, len(wave) - n + 1)) if len(wave) > n else 0
    piece = wave[start: start + n]
    gain = float(rng.uniform(*gain_db))
    rms = np.sqrt(np.mean(piece ** 2)) or 1.0
    return piece * (0.1 * 10 ** (gain / 20) / rms), start, gain


def _place(length: int, n: int, rng: np.random.Generator) -> int:
    """A uniformly random offset for an event of `length` samples in a clip of n."""
    return int(rng.integers(0, n - length + 1))


def build_benchmark(out_dir: str, seed: int = 0, clip_seconds: float = 4.0, train_clips_per_class: int = 12,
                    test_clips_per_class: int = 6, train_scenes: int = 120, test_scenes: int = 60, min_events: int = 2,
                    max_events: int = 4, test_fraction: float = 0.3, gain_db: Tuple[float, float] = (-10.0, 0.0),
                    source: str = "auto", phrases_per_program: int = INSTRUMENT_PHRASES) -> Benchmark:
    """Write the benchmark (module docstring) under `out_dir/recordings` or `out_dir/synthesised`.

    source: "recordings" (the packaged recordings; an error when fewer than two classes have two
    recordings), "instruments" (GM instrument families rendered by fluidsynth; an error when
    fluidsynth or a soundfont is missing), "synthetic" (the labelled synthesised fallback) or
    "auto" (recordings when available, else the fallback). phrases_per_program: the instruments'
    recordings per GM program (more: more varied clips, and test clips from more held-out phrases).
    The same arguments and the same installed files give the same benchmark, byte for byte.
    """
    if source not in ("auto", "recordings", "instruments", "synthetic"):
        raise ValueError(f"source must be 'auto', 'recordings', 'instruments' or 'synthetic', got {source!r}")
    if source == "instruments" and not instruments_available():
        raise ValueError(f"the instruments benchmark needs fluidsynth and a GM soundfont ({', '.join(SOUNDFONTS)}): "
                         "apt-get install fluidsynth fluid-soundfont-gm")
    if not 1 <= min_events <= max_events:
        raise ValueError(f"need 1 <= min_events <= max_events, got {min_events}, {max_events}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if min(train_clips_per_class, test_clips_per_class, train_scenes, test_scenes) < 0:
        raise ValueError("clip and scene counts must be >= 0")
    if phrases_per_program < 1:
        raise ValueError(f"phrases_per_program must be >= 1, got {phrases_per_program}")
    import soundfile as sf

    n = int(round(clip_seconds * SAMPLE_RATE))
    if _audio.num_frames(n) == 0:
        raise ValueError(f"clip_seconds={clip_seconds} gives no fbank frame")

    found = recorded_sources() if source in ("auto", "recordings") else {}
    usable = {label: recs for label, recs in found.items() if len(recs) >= 2}
    synthesised = source == "synthetic" or (source == "auto" and len(usable) < 2)
    if source == "recordings" and len(usable) < 2:
        raise ValueError(f"only {len(usable)} classes have two or more recordings installed; install {', '.join(PACKAGES)}")
    n_classes = (len(SYNTHETIC_CLASSES) if synthesised else len(INSTRUMENT_FAMILIES) if source == "instruments"
                 else len(usable))
    if max_events > n_classes:
        raise ValueError(f"max_events={max_events} exceeds the number of classes")

    if synthesised:
        names = dict(SYNTHETIC_CLASSES)
        waves = {}
        for c, label in enumerate(names):
            for r in range(SYNTHETIC_RECORDINGS_PER_CLASS):
                waves[f"synthetic:{label}/{r}"] = _synthetic_recording(label, np.random.default_rng([seed, 1, c, r]))
        recordings = {label: sorted(k for k in waves if k.startswith(f"synthetic:{label}/")) for label in names}
        paths, dropped = {}, []
    elif source == "instruments":
        names = {label: entry[0] for label, entry in INSTRUMENT_FAMILIES.items()}
        recordings, waves = _instrument_recordings(seed, phrases_per_program)
        paths, dropped = {}, []
    else:
        names = {label: RECORDED_CLASSES[label][0] for label in usable}
        paths = {rec: path for recs in usable.values() for rec, path in recs}
        recordings = {label: [rec for rec, _ in recs] for label, recs in usable.items()}
        dropped = sorted(set(RECORDED_CLASSES) - set(usable))
        waves = {}
    labels = list(names)

    split_of = {}
    for c, label in enumerate(labels):
        split_of[label] = _split_recordings(recordings[label], np.random.default_rng([seed, 2, c]), test_fraction)

    def wave_of(rec: str) -> np.ndarray:
        if rec not in waves:
            waves[rec] = _load_recording(paths[rec])
        return waves[rec]

    root = os.path.join(os.path.abspath(out_dir), "synthesised" if synthesised else source if source == "instruments" else "recordings")
    os.makedirs(root, exist_ok=True)
    descriptors = os.path.join(root, "label_descriptors.csv")
    with open(descriptors, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([i, label, names[label]] for i, label in enumerate(labels))

    plans = {
        "mono_train": [[labels[c]] for c in range(len(labels)) for _ in range(train_clips_per_class)],
        "mono_test": [[labels[c]] for c in range(len(labels)) for _ in range(test_clips_per_class)],
    }
    for s, (split, count) in enumerate((("poly_train", train_scenes), ("poly_test", test_scenes))):
        rng = np.random.default_rng([seed, 3, s])
        plans[split] = [[labels[c] for c in sorted(rng.choice(len(labels), int(rng.integers(min_events, max_events + 1)), replace=False))]
                        for _ in range(count)]

    manifests, label_files, event_files, split_info = {}, {}, {}, {}
    for s, split in enumerate(SPLITS):
        part = 1 if split.endswith("test") else 0
        rng = np.random.default_rng([seed, 4, s])
        os.makedirs(os.path.join(root, "audio", split), exist_ok=True)
        rel_paths, lbl_lines, clip_events = [], [], []
        for i, clip_labels in enumerate(plans[split]):
            clip = np.zeros(n)
            events = []
            for label in clip_labels:
                pool = split_of[label][part]
                rec = pool[int(rng.integers(len(pool)))]
                piece, crop, gain = _event(wave_of(rec), n, rng, gain_db)
                offset = _place(len(piece), n, rng)
                clip[offset: offset + len(piece)] += piece
                events.append({"label": label, "recording": rec, "crop_start_s": crop / SAMPLE_RATE,
                               "offset_s": offset / SAMPLE_RATE, "duration_s": len(piece) / SAMPLE_RATE, "gain_db": gain})
            peak = np.abs(clip).max()
            if peak > 0.99:
                clip *= 0.99 / peak
            clip_id = f"{split}_{i:05d}"
            rel = f"audio/{split}/{clip_id}.wav"
            sf.write(os.path.join(root, rel), clip.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
            rel_paths.append(rel)
            lbl_lines.append(f"{clip_id}\t{','.join(clip_labels)}\n")
            clip_events.append({"id": clip_id, "path": rel, "events": events})
        manifests[split] = os.path.join(root, f"{split}.tsv")
        _data.Manifest(manifests[split], root, rel_paths, [n] * len(rel_paths)).write(manifests[split])
        label_files[split] = os.path.join(root, f"{split}.lbl")
        with open(label_files[split], "w", encoding="utf-8") as f:
            f.writelines(lbl_lines)
        event_files[split] = os.path.join(root, f"{split}.events.json")
        with open(event_files[split], "w", encoding="utf-8") as f:
            json.dump({"synthesised": synthesised, "clips": clip_events}, f, indent=1)
        counts = {label: sum(label in c for c in plans[split]) for label in labels}
        split_info[split] = {"manifest": os.path.basename(manifests[split]), "labels": os.path.basename(label_files[split]),
                             "events": os.path.basename(event_files[split]), "clips": len(plans[split]), "class_counts": counts}

    info = {
        "name": "sslam-fast polyphonic benchmark" + (" (SYNTHESISED fallback)" if synthesised else ""),
        "synthesised": synthesised,
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
        "clip_seconds": n / SAMPLE_RATE,
        "events_per_scene": [min_events, max_events],
        "gain_db": list(gain_db),
        "test_fraction": test_fraction,
        "source": "synthetic" if synthesised else source if source == "instruments" else "recordings",
        "packages": ({} if synthesised else {"fluidsynth": shutil.which("fluidsynth"), "soundfont": soundfont()}
                     if source == "instruments" else {p: _package_dir(p) for p in PACKAGES}),
        "dropped_classes": dropped,
        "classes": [{"index": i, "label": label, "name": names[label],
                     "train_recordings": split_of[label][0], "test_recordings": split_of[label][1]} for i, label in enumerate(labels)],
        "splits": split_info,
    }
    with open(os.path.join(root, "benchmark.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return Benchmark(root=root, synthesised=synthesised, classes=labels, manifests=manifests, labels=label_files,
                     events=event_files, descriptors=descriptors, info=info)
