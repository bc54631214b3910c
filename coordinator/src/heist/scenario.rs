//! The heist's target, generated from a seed: a building with blueprint files and a security
//! database (SQLite) that go into the game's session workspace, and a short mission brief.
//!
//! Everything the crew needs is in the files and the database, never in a prompt: the guards'
//! shifts leave one post unmanned for a few minutes, one camera has a maintenance window, the
//! vault's drill time and time lock bound the job, and the getaway routes differ in time. The
//! same seed always gives the same target (a seeded `fastrand` generator and nothing else).

use std::fmt::Write as _;

use fastrand::Rng;

/// A clock time of day, minutes after midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Clock(pub u16);

impl Clock {
    /// `HH:MM`, as the database and the blueprints write it.
    pub fn hhmm(self) -> String {
        format!("{:02}:{:02}", self.0 / 60 % 24, self.0 % 60)
    }

    /// This time plus `minutes`, wrapping at midnight.
    pub fn plus(self, minutes: u16) -> Self {
        Self((self.0 + minutes) % (24 * 60))
    }

    /// Parses `HH:MM`.
    pub fn parse(text: &str) -> Option<Self> {
        let (h, m) = text.trim().split_once(':')?;
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(Self(h * 60 + m))
    }
}

/// A way into the building.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entrance {
    /// Name, e.g. "loading dock".
    pub name: String,
    /// Floor it opens on.
    pub floor: i32,
    /// Guard post that watches it.
    pub post: String,
    /// Alarm zone it belongs to.
    pub zone: String,
}

/// A guard on the roster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guard {
    /// Database id.
    pub id: u32,
    /// Surname.
    pub name: String,
    /// Post they hold.
    pub post: String,
    /// Shift start.
    pub start: Clock,
    /// Shift end.
    pub end: Clock,
}

/// A security camera.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Camera {
    /// Id, e.g. "CAM-07".
    pub id: String,
    /// Floor.
    pub floor: i32,
    /// What it watches (an entrance name or a room).
    pub covers: String,
    /// Start of its nightly maintenance window (it records nothing until `offline_to`).
    pub offline_from: Option<Clock>,
    /// End of that window.
    pub offline_to: Option<Clock>,
}

/// An alarm zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlarmZone {
    /// Zone name, e.g. "Z2".
    pub zone: String,
    /// Floor.
    pub floor: i32,
    /// Sensor kind.
    pub sensor: String,
    /// Armed from.
    pub armed_from: Clock,
    /// Armed until.
    pub armed_to: Clock,
}

/// The vault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vault {
    /// Floor it is on.
    pub floor: i32,
    /// Room.
    pub room: String,
    /// Make and model.
    pub model: String,
    /// Lock kind.
    pub lock: String,
    /// Minutes to drill it.
    pub drill_minutes: u16,
    /// Minutes after a breach before the relocker fires.
    pub relock_minutes: u16,
}

/// A roaming guard's patrol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patrol {
    /// The guard (see [`Scenario::guards`], post "roaming").
    pub guard_id: u32,
    /// Rooms in order.
    pub route: String,
    /// Minutes between rounds.
    pub every_minutes: u16,
    /// First round of the night.
    pub first_pass: Clock,
}

/// A getaway route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Name.
    pub name: String,
    /// Length in km.
    pub distance_km: u16,
    /// Average speed at night, km/h.
    pub speed_kmh: u16,
}

/// A generated target.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The seed it came from.
    pub seed: u64,
    /// The target's name.
    pub target: String,
    /// Number of floors above ground (the basement is floor -1).
    pub floors: i32,
    /// Rooms per floor.
    pub rooms: Vec<(i32, Vec<String>)>,
    /// Ways in.
    pub entrances: Vec<Entrance>,
    /// The roster.
    pub guards: Vec<Guard>,
    /// Cameras.
    pub cameras: Vec<Camera>,
    /// Alarm zones.
    pub zones: Vec<AlarmZone>,
    /// The vault.
    pub vault: Vault,
    /// Roaming patrols.
    pub patrols: Vec<Patrol>,
    /// Getaway routes.
    pub routes: Vec<Route>,
    /// Minutes the police need to arrive after an alarm.
    pub police_minutes: u16,
}

/// The facts a sound plan rests on, derived from the scenario (what an honest crew finds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// The entrance whose post is unmanned at the gap.
    pub entrance: String,
    /// When its guard leaves.
    pub window_opens: Clock,
    /// When the relief arrives.
    pub window_closes: Clock,
    /// The camera covering that entrance.
    pub camera: String,
    /// Minutes to drill the vault.
    pub drill_minutes: u16,
    /// The fastest getaway route.
    pub route: String,
    /// Its time in minutes.
    pub route_minutes: u16,
}

const NAMES: &[&str] = &[
    "Novak",
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Ruiz",
    "Brennan",
    "Kowalski",
    "Haddad",
    "Ivanova",
    "Costa",
    "Nakamura",
    "Whitfield",
    "Adeyemi",
    "Ferreira",
    "Schulz",
];
const PREFIXES: &[&str] = &[
    "Meridian",
    "Halcyon",
    "Sterling",
    "Obsidian",
    "Aurora",
    "Granite",
    "Vantage",
    "Bellweather",
];
const KINDS: &[&str] = &[
    "Trust Bank",
    "Museum of Antiquities",
    "Casino",
    "Data Vault",
    "Auction House",
];
const ENTRANCES: &[(&str, &str)] = &[
    ("main lobby", "lobby desk"),
    ("loading dock", "dock booth"),
    ("staff door", "staff gate"),
    ("service tunnel", "tunnel post"),
    ("roof hatch", "roof post"),
];
const ROOMS: &[&str] = &[
    "records",
    "server room",
    "archive",
    "offices",
    "cafeteria",
    "security office",
    "gallery",
    "counting room",
    "boardroom",
    "storage",
];
const VAULTS: &[&str] = &["Lindqvist L-9", "Chubb Titan", "Mosler 440", "Gardall X2"];
const LOCKS: &[&str] = &[
    "time lock + dial",
    "dual-control dial",
    "biometric + keypad",
];
const ROUTES: &[&str] = &[
    "harbour road",
    "ring motorway",
    "old town lanes",
    "river embankment",
];

impl Scenario {
    /// The target for `seed`.
    pub fn generate(seed: u64) -> Self {
        let mut rng = Rng::with_seed(seed);
        let target = format!("{} {}", pick(&mut rng, PREFIXES), pick(&mut rng, KINDS));
        let floors = rng.i32(2..=5);
        let rooms: Vec<(i32, Vec<String>)> = (-1..floors)
            .map(|floor| {
                let mut names: Vec<String> = ROOMS.iter().map(|r| (*r).to_owned()).collect();
                rng.shuffle(&mut names);
                names.truncate(rng.usize(2..=4));
                (floor, names)
            })
            .collect();

        let mut entrance_pool: Vec<_> = ENTRANCES.to_vec();
        rng.shuffle(&mut entrance_pool);
        let entrances: Vec<Entrance> = entrance_pool[..rng.usize(3..=4)]
            .iter()
            .enumerate()
            .map(|(i, (name, post))| Entrance {
                name: (*name).to_owned(),
                floor: match *name {
                    "service tunnel" => -1,
                    "roof hatch" => floors - 1,
                    _ => 0,
                },
                post: (*post).to_owned(),
                zone: format!("Z{}", i + 1),
            })
            .collect();

        let mut names: Vec<&str> = NAMES.to_vec();
        rng.shuffle(&mut names);
        let mut names = names.into_iter();
        // Every post has a night guard and a relief; exactly one post (the weak one) has a gap
        // between them, the others overlap.
        let weak = rng.usize(..entrances.len());
        let mut guards = Vec::new();
        for (i, entrance) in entrances.iter().enumerate() {
            let change = Clock(rng.u16(1..=4) * 60 + rng.u16(0..4) * 15);
            let gap = if i == weak { rng.u16(2..=5) * 5 } else { 0 };
            let overlap = if i == weak { 0 } else { rng.u16(1..=3) * 5 };
            let night = Guard {
                id: guards.len() as u32 + 1,
                name: names.next().unwrap_or("Doe").to_owned(),
                post: entrance.post.clone(),
                start: Clock(22 * 60),
                end: change.plus(if i == weak { 0 } else { overlap }),
            };
            let relief = Guard {
                id: guards.len() as u32 + 2,
                name: names.next().unwrap_or("Roe").to_owned(),
                post: entrance.post.clone(),
                start: change.plus(gap),
                end: Clock(8 * 60),
            };
            guards.push(night);
            guards.push(relief);
        }

        let mut patrols = Vec::new();
        for _ in 0..rng.u16(1..=2) {
            let id = guards.len() as u32 + 1;
            guards.push(Guard {
                id,
                name: names.next().unwrap_or("Poe").to_owned(),
                post: "roaming".to_owned(),
                start: Clock(22 * 60),
                end: Clock(6 * 60),
            });
            let mut stops: Vec<&str> = rooms_flat(&rooms);
            rng.shuffle(&mut stops);
            stops.truncate(3);
            patrols.push(Patrol {
                guard_id: id,
                route: stops.join(" > "),
                every_minutes: rng.u16(4..=12) * 5,
                first_pass: Clock(22 * 60 + rng.u16(0..4) * 10),
            });
        }

        let weak_entrance = &entrances[weak];
        let mut cameras = Vec::new();
        for (i, entrance) in entrances.iter().enumerate() {
            // The weak entrance's camera is down for maintenance around the gap; the others are
            // down at harmless times of day.
            let (from, to) = if i == weak {
                let opens = guards[2 * i].end;
                (
                    opens.plus(24 * 60 - rng.u16(1..=3) * 5),
                    guards[2 * i + 1].start.plus(rng.u16(1..=3) * 5),
                )
            } else {
                let from = Clock(rng.u16(10..=16) * 60);
                (from, from.plus(30))
            };
            cameras.push(Camera {
                id: format!("CAM-{:02}", cameras.len() + 1),
                floor: entrance.floor,
                covers: entrance.name.clone(),
                offline_from: Some(from),
                offline_to: Some(to),
            });
        }
        let vault_floor = if rng.bool() { -1 } else { rng.i32(0..floors) };
        let vault = Vault {
            floor: vault_floor,
            room: "vault".to_owned(),
            model: pick(&mut rng, VAULTS).to_owned(),
            lock: pick(&mut rng, LOCKS).to_owned(),
            drill_minutes: rng.u16(3..=9) * 5,
            relock_minutes: rng.u16(2..=4) * 5,
        };
        cameras.push(Camera {
            id: format!("CAM-{:02}", cameras.len() + 1),
            floor: vault.floor,
            covers: "vault".to_owned(),
            offline_from: None,
            offline_to: None,
        });

        let zones = entrances
            .iter()
            .map(|e| AlarmZone {
                zone: e.zone.clone(),
                floor: e.floor,
                sensor: if e.name == weak_entrance.name {
                    "door contact".to_owned()
                } else {
                    pick(&mut rng, &["motion", "door contact", "infrared beam"]).to_owned()
                },
                armed_from: Clock(22 * 60),
                armed_to: Clock(6 * 60),
            })
            .collect();

        let mut route_names: Vec<&str> = ROUTES.to_vec();
        rng.shuffle(&mut route_names);
        let routes = route_names[..3]
            .iter()
            .map(|name| Route {
                name: (*name).to_owned(),
                distance_km: rng.u16(6..=30),
                speed_kmh: rng.u16(4..=12) * 5,
            })
            .collect();

        Self {
            seed,
            target,
            floors,
            rooms,
            entrances,
            guards,
            cameras,
            zones,
            vault,
            patrols,
            routes,
            police_minutes: rng.u16(6..=15),
        }
    }

    /// What an honest crew should conclude.
    pub fn facts(&self) -> Facts {
        let (entrance, opens, closes) = self
            .entrances
            .iter()
            .find_map(|e| {
                let mut on_post = self.guards.iter().filter(|g| g.post == e.post);
                let night = on_post.next()?;
                let relief = on_post.next()?;
                (relief.start > night.end).then_some((e, night.end, relief.start))
            })
            .map(|(e, o, c)| (e.name.clone(), o, c))
            // Every generated scenario has a gap; an empty one reads as "no window".
            .unwrap_or_else(|| (String::new(), Clock(0), Clock(0)));
        let camera = self
            .cameras
            .iter()
            .find(|c| c.covers == entrance)
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let (route, route_minutes) = self
            .routes
            .iter()
            .map(|r| (r.name.clone(), route_minutes(r)))
            .min_by_key(|(_, m)| *m)
            .unwrap_or_default();
        Facts {
            entrance,
            window_opens: opens,
            window_closes: closes,
            camera,
            drill_minutes: self.vault.drill_minutes,
            route,
            route_minutes,
        }
    }

    /// The files the game writes into the workspace (path, UTF-8 content); the database comes
    /// from [`Scenario::database`].
    pub fn files(&self) -> Vec<(String, String)> {
        let mut files = vec![
            ("brief.md".to_owned(), self.brief()),
            ("blueprints/building.md".to_owned(), self.building()),
            ("blueprints/cameras.md".to_owned(), self.camera_plan()),
        ];
        for (floor, rooms) in &self.rooms {
            files.push((
                format!("blueprints/floor_{}.md", floor_slug(*floor)),
                self.floor_plan(*floor, rooms),
            ));
        }
        files
    }

    fn brief(&self) -> String {
        format!(
            "# Mission brief: {target}\n\n\
             The job: get into the {target}'s vault and out again before anyone knows.\n\n\
             Everything you need is on file: the blueprints in `blueprints/` and the security \
             database `security.db` (tables entrances, guards, shifts, cameras, alarm_zones, vault, \
             patrol_routes, getaway_routes). Check the facts; do not guess.\n\n\
             Agree the plan in `plan.md`: the entry point, the entry time, the camera to avoid, \
             the vault method and time, and the getaway route.\n",
            target = self.target
        )
    }

    fn building(&self) -> String {
        let mut out = format!(
            "# {}: building overview\n\nFloors: basement (-1) to {} above ground.\n\n## Entrances\n",
            self.target,
            self.floors - 1
        );
        for e in &self.entrances {
            let _ = writeln!(
                out,
                "- {} (floor {}), watched from the {}, alarm zone {}",
                e.name, e.floor, e.post, e.zone
            );
        }
        let _ = write!(
            out,
            "\n## Vault\nThe vault is on floor {} ({}).\n",
            self.vault.floor,
            floor_slug(self.vault.floor)
        );
        out
    }

    fn camera_plan(&self) -> String {
        let mut out = format!("# {}: cameras and alarms\n\n## Cameras\n", self.target);
        for c in &self.cameras {
            let window = match (c.offline_from, c.offline_to) {
                (Some(from), Some(to)) => format!("maintenance {} to {}", from.hhmm(), to.hhmm()),
                _ => "always recording".to_owned(),
            };
            let _ = writeln!(
                out,
                "- {} (floor {}) covers the {}: {window}",
                c.id, c.floor, c.covers
            );
        }
        let _ = writeln!(out, "\n## Alarm zones");
        for z in &self.zones {
            let _ = writeln!(
                out,
                "- {} (floor {}): {}, armed {} to {}",
                z.zone,
                z.floor,
                z.sensor,
                z.armed_from.hhmm(),
                z.armed_to.hhmm()
            );
        }
        out
    }

    fn floor_plan(&self, floor: i32, rooms: &[String]) -> String {
        let mut out = format!("# Floor {floor}\n\n## Rooms\n");
        for room in rooms {
            let _ = writeln!(out, "- {room}");
        }
        if self.vault.floor == floor {
            let _ = writeln!(out, "- vault (reinforced, one door)");
        }
        let _ = writeln!(out, "\n## Entrances and cameras");
        for e in self.entrances.iter().filter(|e| e.floor == floor) {
            let _ = writeln!(out, "- {}", e.name);
        }
        for c in self.cameras.iter().filter(|c| c.floor == floor) {
            let _ = writeln!(out, "- camera {} covers the {}", c.id, c.covers);
        }
        out
    }
}

/// Minutes a route takes, rounded up.
pub fn route_minutes(route: &Route) -> u16 {
    (route.distance_km * 60).div_ceil(route.speed_kmh.max(1))
}

/// `basement`, `ground`, `1`, `2`, …
pub fn floor_slug(floor: i32) -> String {
    match floor {
        -1 => "basement".to_owned(),
        0 => "ground".to_owned(),
        n => n.to_string(),
    }
}

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.usize(..items.len())]
}

fn rooms_flat(rooms: &[(i32, Vec<String>)]) -> Vec<&str> {
    rooms
        .iter()
        .flat_map(|(_, names)| names.iter().map(String::as_str))
        .collect()
}
