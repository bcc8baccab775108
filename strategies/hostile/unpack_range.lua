-- table.unpack of a big range in a loop.
return { plan = function(ctx)
    while true do
        local n = select('#', table.unpack({}, 1, 200000))
    end
end }
