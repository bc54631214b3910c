//! The heist through the real cluster on the scripted model: a whole game streamed live, the
//! analysis and the reveal, games kept across a coordinator restart, and a fork after round 2
//! that plays on with the player's note.

use futures::StreamExt as _;
use heist_proto::v1::{self, heist_event::Event, heist_service_client::HeistServiceClient};
use tonic::{Code, transport::Channel};

use crate::harness::*;

async fn heists(url: &str) -> HeistServiceClient<Channel> {
    HeistServiceClient::new(channel(url).await)
}

/// A coordinator with two workers, the admin client and a HeistService client.
async fn cluster(
    dir: &std::path::Path,
    config: heist_coordinator::Config,
) -> (
    Coordinator,
    [Worker; 2],
    Client,
    HeistServiceClient<Channel>,
) {
    let coord = Coordinator::start(config).await;
    let w1 = Worker::start(&coord.url(), dir, WorkerOpts::new("w1")).await;
    let w2 = Worker::start(&coord.url(), dir, WorkerOpts::new("w2")).await;
    let mut client = Client::admin(&coord.url()).await;
    client.wait_ready(&["w1", "w2"]).await;
    let heist = heists(&coord.url()).await;
    (coord, [w1, w2], client, heist)
}

/// Starts a game and drains its stream.
async fn play_game(
    heist: &mut HeistServiceClient<Channel>,
    token: &str,
    request: v1::StartHeistRequest,
) -> Vec<v1::HeistEvent> {
    let events = heist
        .start_heist(authed(token, request))
        .await
        .expect("start")
        .into_inner();
    drain(events).await
}

/// Every event of a game stream, in order.
async fn drain(mut events: tonic::Streaming<v1::HeistEvent>) -> Vec<v1::HeistEvent> {
    let mut out = Vec::new();
    while let Some(event) = events.next().await {
        out.push(event.expect("heist event"));
    }
    out
}

fn finished(events: &[v1::HeistEvent]) -> v1::Heist {
    match events.last().and_then(|e| e.event.clone()) {
        Some(Event::Finished(game)) => game,
        other => panic!("the stream did not end with `finished`: {other:?}"),
    }
}

fn final_messages(events: &[v1::HeistEvent], round: u32) -> Vec<String> {
    let mut current = 0;
    let mut out = Vec::new();
    for e in events {
        match &e.event {
            Some(Event::RoundStarted(r)) => current = *r,
            Some(Event::Turn(t)) if current == round => {
                if let Some(v1::turn_event::Event::FinalMessage(m)) = &t.event {
                    out.push(format!("{}: {m}", t.agent));
                }
            }
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_game_is_played_analyzed_guessed_and_kept_across_a_restart() {
    let dir = crate::harness::tempdir();
    let config = coordinator_config(&dir.path().join("c"));
    let (coord, [w1, w2], client, mut heist) = cluster(dir.path(), config.clone()).await;

    let start = v1::StartHeistRequest {
        seed: 7,
        rounds: 3,
        model: String::new(),
        request_id: "r-heist-1".into(),
    };
    let events = drain(
        heist
            .start_heist(authed(&client.token, start.clone()))
            .await
            .expect("start")
            .into_inner(),
    )
    .await;
    let game = finished(&events);
    assert_eq!(game.state, v1::HeistState::AwaitingGuess as i32, "{game:?}");
    // Numbered without gaps, three rounds, each checkpointed, six crew members per round.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    let rounds: Vec<&v1::RoundFinished> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::RoundFinished(r)) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rounds.len(), 3);
    assert!(
        rounds[2].plan.contains("- entry:") && rounds[2].plan.contains("FINAL"),
        "{}",
        rounds[2].plan
    );
    assert_eq!(final_messages(&events, 1).len(), 6);
    // Nothing a player can read names the mole before the reveal.
    for e in &events {
        let text = format!("{e:?}");
        assert!(
            !text.contains("sabotage") && !text.contains("Secretly"),
            "an event leaks the mole: {text}"
        );
    }
    // A retry of StartHeist with the same request id attaches to the same game.
    let again = drain(
        heist
            .start_heist(authed(&client.token, start))
            .await
            .expect("start again")
            .into_inner(),
    )
    .await;
    assert_eq!(finished(&again).id, game.id);

    let analysis = heist
        .analyze(authed(
            &client.token,
            v1::AnalyzeRequest {
                game_id: game.id.clone(),
            },
        ))
        .await
        .expect("analyze")
        .into_inner();
    assert_eq!(analysis.suspects.len(), 6, "{analysis:?}");
    let top = analysis.suspects[0].clone();
    assert!(top.score > 0.0 && !top.evidence.is_empty(), "{analysis:?}");

    let result = heist
        .guess(authed(
            &client.token,
            v1::GuessRequest {
                game_id: game.id.clone(),
                agent: top.agent.clone(),
            },
        ))
        .await
        .expect("guess")
        .into_inner();
    assert_eq!(result.analyzer_pick, top.agent);
    assert!(!result.mole.is_empty() && !result.pattern.is_empty());
    assert_eq!(result.correct, result.mole == top.agent);
    let outcome = result.game.as_ref().expect("game").outcome;
    assert_ne!(outcome, v1::HeistOutcome::Unspecified as i32);
    let err = heist
        .guess(authed(
            &client.token,
            v1::GuessRequest {
                game_id: game.id.clone(),
                agent: "intel".into(),
            },
        ))
        .await
        .expect_err("a second guess");
    assert_eq!(err.code(), Code::FailedPrecondition);

    // The coordinator restarts: the game, its events and the statistics are still there.
    coord.stop().await;
    let coord = Coordinator::start_on(&format!("127.0.0.1:{}", free_port()), config).await;
    let client = Client::admin(&coord.url()).await;
    let mut heist = heists(&coord.url()).await;
    let kept = heist
        .get_heist(authed(
            &client.token,
            v1::GetHeistRequest {
                game_id: game.id.clone(),
            },
        ))
        .await
        .expect("get after restart")
        .into_inner();
    assert_eq!(kept.state, v1::HeistState::Done as i32);
    assert_eq!(kept.outcome, outcome);
    let replay = drain(
        heist
            .watch_heist(authed(
                &client.token,
                v1::WatchHeistRequest {
                    game_id: game.id.clone(),
                    from_seq: 1,
                },
            ))
            .await
            .expect("watch after restart")
            .into_inner(),
    )
    .await;
    assert_eq!(replay.len(), events.len());
    let stats = heist
        .stats(authed(&client.token, v1::HeistStatsRequest {}))
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((stats.games, stats.completed, stats.guessed), (1, 1, 1));
    assert_eq!(
        stats.analyzer_accuracy,
        if result.mole == top.agent { 1.0 } else { 0.0 }
    );
    let pattern = stats
        .patterns
        .iter()
        .find(|p| p.pattern == result.pattern)
        .expect("pattern row");
    assert_eq!(pattern.games, 1);

    coord.stop().await;
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_game_forked_after_round_two_plays_on_differently() {
    let dir = crate::harness::tempdir();
    let config = coordinator_config(&dir.path().join("c"));
    let (coord, [w1, w2], client, mut heist) = cluster(dir.path(), config).await;

    let start = v1::StartHeistRequest {
        seed: 11,
        rounds: 3,
        ..Default::default()
    };
    let original = play_game(&mut heist, &client.token, start).await;
    let game = finished(&original);
    assert_eq!(game.state, v1::HeistState::AwaitingGuess as i32, "{game:?}");

    let fork = v1::ForkHeistRequest {
        game_id: game.id.clone(),
        round: 2,
        model: String::new(),
        note: "The relief guard is always early: move ten minutes sooner.".into(),
        request_id: String::new(),
    };
    let forked = drain(
        heist
            .fork_heist(authed(&client.token, fork))
            .await
            .expect("fork")
            .into_inner(),
    )
    .await;
    let child = finished(&forked);
    assert_eq!(
        child.state,
        v1::HeistState::AwaitingGuess as i32,
        "{child:?}"
    );
    assert_eq!(child.forked_from, game.id);
    assert_eq!(child.forked_at_round, 2);
    assert_eq!(child.round_checkpoints.len(), 3);
    assert_eq!(
        child.round_checkpoints[..2],
        game.round_checkpoints[..2],
        "the same history up to the fork"
    );
    assert_ne!(child.session_id, game.session_id);
    // Rounds 1-2 are the original's; round 3 was played again, with the note in every message.
    assert_eq!(final_messages(&forked, 1), final_messages(&original, 1));
    let note_heard = forked.iter().any(|e| match &e.event {
        Some(Event::Turn(t)) => matches!(&t.event, Some(v1::turn_event::Event::Started(m)) if m.contains("move ten minutes sooner")),
        _ => false,
    });
    assert!(note_heard, "the crew did not get the note after the fork");
    let err = heist
        .fork_heist(authed(
            &client.token,
            v1::ForkHeistRequest {
                game_id: game.id.clone(),
                round: 9,
                ..Default::default()
            },
        ))
        .await
        .expect_err("a fork after a round that was not played");
    assert_eq!(err.code(), Code::InvalidArgument);

    coord.stop().await;
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_game_that_fails_midway_says_why_and_gives_its_session_back() {
    let dir = crate::harness::tempdir();
    let config = coordinator_config(&dir.path().join("c"));
    let (coord, [w1, w2], mut client, mut heist) = cluster(dir.path(), config).await;

    // The session is opened and the target written before the first turn finds the model
    // chain missing.
    let start = v1::StartHeistRequest {
        seed: 5,
        rounds: 2,
        model: "no-such-chain".into(),
        ..Default::default()
    };
    let events = play_game(&mut heist, &client.token, start).await;
    let game = finished(&events);
    assert_eq!(game.state, v1::HeistState::Failed as i32, "{game:?}");
    assert!(
        game.failure_reason.contains("no-such-chain"),
        "the reason should name the chain: {}",
        game.failure_reason
    );
    assert!(!game.session_id.is_empty(), "{game:?}");
    let session = client
        .get_session(&game.session_id)
        .await
        .expect("the failed game's session");
    assert_eq!(
        session.state,
        v1::SessionState::Closed as i32,
        "a failed game must not keep its session (and a worker slot): {session:?}"
    );

    coord.stop().await;
    w1.stop().await;
    w2.stop().await;
}
